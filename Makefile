# The two set-up commands of the README: `make demo` and `make test`. Both install first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saofu-installed

.PHONY: demo test install bench lint clean

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/saofu demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=40

bench: $(STAMP)
	$(VENV)/bin/saofu bench models

lint: $(STAMP)
	$(VENV)/bin/ruff check saofu models tasks flows deploy services bench tests

clean:
	rm -rf runs data/.cache .pytest_cache
