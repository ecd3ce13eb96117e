"""`saofu bench reliability`: a suite that tries to break saofu, counted in one table.

Each module runs one kind of attack and returns a `Section` (`bench.reliability.section`); the
tests in `tests/reliability/` call the same functions at small sizes and assert on them, and
`bench.reliability.run` calls them at full size, adds the counts up and writes
`bench/results/reliability.json`.

- `corpus`: bad input (broken, truncated, bomb and malformed images, unknown labels, empty
  exports, duplicate tasks, path and split attacks, malformed flow parameters, a corrupt ONNX)
  offered to the serving app, ingest and training;
- `faults`: faults injected (Label Studio or MLflow unreachable, a killed training process or
  search worker, the serving process restarted under load, a full disk under the pool);
- `load`: requests to the serving app while models are swapped and a canary rolls back;
- `secrets_scan`: recognisable secrets set, everything printed and written searched for them.
"""
