#!/usr/bin/env bash
# One-time set-up of a fresh machine: CJK fonts (system packages), the virtual env, the project.
# Idempotent: `make` calls it whenever pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# Fonts for the Fu world. Several designs are needed: fonts are split between train and test.
FONT_PACKAGES="fonts-noto-cjk fonts-arphic-ukai fonts-arphic-uming fonts-wqy-zenhei fonts-wqy-microhei \
fonts-arphic-gkai00mp fonts-arphic-bsmi00lp fonts-arphic-gbsn00lp fonts-ipafont-gothic fonts-ipafont-mincho \
fonts-vlgothic fonts-seto fonts-klee fonts-lxgw-wenkai fonts-droid-fallback"
missing=""
for pkg in $FONT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing CJK fonts:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  elif command -v apt-get >/dev/null && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  elif [ -z "$(fc-list :lang=zh 2>/dev/null)" ]; then
    echo "error: no CJK fonts found and cannot install them (need root and apt-get)." >&2
    echo "       install the Debian packages:$missing" >&2
    echo "       or point SAOFU_FONT_DIRS at a folder of .ttf/.ttc/.otf CJK fonts." >&2
    exit 1
  else
    echo "warning: some CJK font packages are missing ($missing); the Fu world will use the fonts present." >&2
  fi
fi

# PostgreSQL server binaries: the study storage that several search workers share (the tests start
# a throwaway server on loopback; `saofu up postgres` starts one for users).
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing PostgreSQL server binaries"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  else
    echo "warning: PostgreSQL (initdb, pg_ctl, postgres) not found and cannot be installed here;" >&2
    echo "         multi-worker search and its tests need it: apt-get install postgresql" >&2
  fi
fi

# Chromium from Debian's packages: the browser tests drive the Prefect and MLflow UIs with Playwright,
# which launches this browser (executable_path) and downloads none of its own.
if ! command -v chromium >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing chromium (the browser tests' browser)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  elif command -v apt-get >/dev/null && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "warning: chromium not found and cannot be installed here; the browser tests need it:" >&2
    echo "         apt-get install chromium" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# constraints.txt pins the whole working set that CI tests; pyproject.toml holds the direct deps.
"$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[dev]'
echo "set-up done: $VENV"
