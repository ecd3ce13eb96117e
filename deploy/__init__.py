"""The serving app: onnxruntime behind a small HTTP API (see deploy/README.md).

Modules, one job each:

* `model_source` - resolve `models:/<name>@champion` (and `@challenger`) in the MLflow registry,
  build onnxruntime sessions, and swap to a newly promoted version atomically.
* `canary` - send a share of traffic to the challenger, watch live metrics per arm, roll back.
* `pool_log` - write each request's image and prediction into the online pool (bounded).
* `app` - the ASGI app (`/predict`, `/healthz`, `/metrics`).
* `server` - `serve(...)`: uvicorn on loopback, what `saofu serve` calls.

Nothing here imports torch or `flows/`: a serving box needs onnxruntime, MLflow's client and PIL.
"""
