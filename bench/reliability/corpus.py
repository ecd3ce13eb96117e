"""Bad input, generated here and offered to every door saofu has: the serving app, ingest, training,
the flows' parameters and the model registry.

Each case is a named kind with the bytes or files it is made of (Pillow, numpy, struct and zlib;
nothing is downloaded). What each door must do with it:

- serving (`offer_to_serving`): a clean 4xx whose JSON names the problem, or, for an odd image a
  camera or scanner really sends (16-bit, CMYK, palette with transparency, EXIF-rotated, 1x1,
  1x5000), a 200 decoded to the right pixels; never a 500, and `/healthz` is ok afterwards;
- ingest (`offer_to_ingest`): bad tasks skipped with a reason naming them, a batch holding broken
  images rejected by the validation suite, and nothing already in the dataset lost or changed;
- training (`offer_to_training`): a clear error naming the file, or the file skipped and named;
  never a traceback, and the odd-but-legitimate images loaded with the right pixels;
- flow parameters (`offer_to_flow_params`): each parameter model refuses the value with an error
  naming the field;
- the registry (`offer_corrupt_onnx`): a corrupt graph registered and promoted is refused, the
  app keeps answering with the version it had and `/healthz` says `degraded`.

`run_corpus` runs all of them and returns the `Section` the reliability bench counts.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.reliability.bad_images import CLASSES, RED, BadImage, encoded, good_images, image_corpus
from bench.reliability.fault_harness import environment
from bench.reliability.ingest_attacks import offer_to_ingest
from bench.reliability.section import Case, Section

MODEL_SIZE = 8  # the colour graph's input side: decoding is what is tested, not the model
COLOUR_W = [[0.1, 0], [0, 0.1], [0.1, 0]]  # logits = mean RGB @ W: red and blue are fu, green not_fu
DEFAULT_MAX_BODY = 4 * 2**20  # deploy.app.ServeConfig.max_body_bytes
PIXEL_TOLERANCE = 24  # JPEG noise after a resize to MODEL_SIZE


# Request kinds: not an image's bytes but how it is sent.
REQUEST_KINDS = ("wrong Content-Type", "body over the size limit")


def _pixels(body: bytes) -> np.ndarray:
    from deploy.decoding import decode_image

    return decode_image(body, MODEL_SIZE, 4096 * 4096)[0][0].astype(int)


def _message(answer) -> tuple[str, str]:
    try:
        data = answer.json()
    except ValueError:
        return "", answer.text[:200]
    return str(data.get("reason", "")), str(data.get("error", ""))


def offer_to_serving(client, kinds: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY) -> list[Case]:
    """Post every image kind (and the request kinds) to `/predict`; then check `/healthz`.

    Args:
        client: an httpx.Client (or Starlette TestClient) whose base URL is the serving app.
        kinds: only these kinds (default: all).
        max_body_bytes: the app's body limit (the oversized body is one byte more).

    Returns:
        One Case per kind, and one for `/healthz` afterwards. A legitimate image's 200 is right when
        `deploy.decoding.decode_image` (what the app runs) gives its reference's pixels.
    """
    cases = []
    for image in image_corpus():
        if kinds is not None and image.kind not in kinds:
            continue
        answer = client.post("/predict", content=image.body, headers={"content-type": image.content_type})
        reason, error = _message(answer)
        got = f"{answer.status_code} {error[:160]}"
        ok = answer.status_code == image.status
        if ok and image.legit:
            diff = int(np.abs(_pixels(image.body) - _pixels(image.reference)).max())
            ok = diff <= PIXEL_TOLERANCE and answer.json().get("class") is not None
            got = f"200, decoded pixels {diff} from the reference (<= {PIXEL_TOLERANCE})"
        elif ok:
            ok = image.names in error and bool(reason)
        expected = "200 with the right pixels" if image.legit else f"{image.status} naming {image.names!r}"
        cases.append(Case(image.kind, "serving", expected, got, ok))
    requests = {
        "wrong Content-Type": (encoded(Image.new("RGB", (8, 8), RED), "PNG"), "text/plain", 415, "Content-Type"),
        "body over the size limit": (b"\x89PNG" + b"\0" * max_body_bytes, "image/png", 413, "bytes"),
    }
    for kind, (body, content_type, status, names) in requests.items():
        if kinds is not None and kind not in kinds:
            continue
        answer = client.post("/predict", content=body, headers={"content-type": content_type})
        reason, error = _message(answer)
        cases.append(Case(kind, "serving", f"{status} naming {names!r}", f"{answer.status_code} {error[:160]}",
                          answer.status_code == status and names in error))
    health = client.get("/healthz")
    status = health.json().get("status") if health.status_code == 200 else None
    cases.append(Case("healthz after the corpus", "serving", "200 ok", f"{health.status_code} {status}",
                      health.status_code == 200 and status == "ok"))
    return cases


# ----------------------------------------------------------------------------------- training


def offer_to_training(folder: str | Path) -> list[Case]:
    """Each image kind written into an ImageFolder class folder beside good images, loaded as training loads.

    One dataset per kind (`folder/<n>/fu/<kind file>`), loaded by `tasks.data.loading.prepare_dataset`
    without its cache. ok: a clear error (SaofuError) naming the file, the file left out and named
    in what was logged or printed, or never read (its suffix is not an image's); for a legitimate
    image: loaded, with the pixels serving decodes. Anything else (a traceback, a broken file
    trained on) is not ok.
    """
    import logging
    import warnings

    from saofu.errors import SaofuError
    from tasks.data.loading import IMAGE_SUFFIXES, prepare_dataset

    cases = []
    for n, image in enumerate(image_corpus()):
        root = Path(folder) / f"{n:02d}"
        good_images(root)
        name = f"corpus-{n:02d}{image.suffix}"
        path = root / "fu" / name
        path.write_bytes(image.body)
        said = io.StringIO()
        handler = logging.StreamHandler(said)
        logging.getLogger().addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as warned, contextlib.redirect_stdout(said), \
                    contextlib.redirect_stderr(said):
                warnings.simplefilter("always")
                data = prepare_dataset(root, image_size=MODEL_SIZE, val_share=0.34, seed=0, cache_dir=None)
            said.write("\n".join(str(w.message) for w in warned))
        except SaofuError as exc:
            ok = name in str(exc) and not image.legit
            cases.append(Case(image.kind, "training", _training_expectation(image), f"SaofuError: {exc}"[:200], ok))
            continue
        except Exception as exc:  # noqa: BLE001 - the finding: a traceback where a clear error belongs
            cases.append(Case(image.kind, "training", _training_expectation(image),
                              f"traceback: {type(exc).__name__}: {exc}"[:200], False))
            continue
        finally:
            logging.getLogger().removeHandler(handler)
        loaded = {Path(p).name: (split, i) for split in (data.train, data.val)
                  for i, p in enumerate(split.paths)}
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            cases.append(Case(image.kind, "training", _training_expectation(image),
                              f"not read ({path.suffix} is not an image suffix)", name not in loaded))
        elif name not in loaded:
            named = name in said.getvalue()
            cases.append(Case(image.kind, "training", _training_expectation(image),
                              "left out" + (" and named" if named else " silently"), named and not image.legit))
        elif image.broken:
            cases.append(Case(image.kind, "training", _training_expectation(image), "loaded: a broken file trained on",
                              False))
        else:
            split, i = loaded[name]
            got = split.images[i].permute(1, 2, 0).numpy().astype(int)
            reference = _pixels(image.reference) if image.reference is not None else None
            diff = int(np.abs(got - reference).max()) if reference is not None else 0
            cases.append(Case(image.kind, "training", _training_expectation(image),
                              f"loaded, pixels {diff} from serving's reference decode", diff <= PIXEL_TOLERANCE))
    return cases


def _training_expectation(image: BadImage) -> str:
    if image.legit:
        return "loaded with the right pixels"
    return "a clear error naming the file, or left out and named"


# ----------------------------------------------------------------------------------- flow parameters


def flow_param_attempts() -> list[tuple[str, str, dict[str, Any], str]]:
    """(kind, parameter model, parameters, the field the error must name)."""
    return [
        ("negative budget", "FastRetrainParams", {"budget_min": -5}, "budget_min"),
        ("budget as text", "FastRetrainParams", {"budget_min": "ten"}, "budget_min"),
        ("class name ..", "FastRetrainParams", {"changes": [{"name": "..", "kind": "new"}]}, "changes.0.name"),
        ("class name with a slash", "FastRetrainParams", {"changes": [{"name": "fu/merchant"}]}, "changes.0.name"),
        ("class name with a NUL byte", "FastRetrainParams", {"changes": [{"name": "fu\0x"}]}, "changes.0.name"),
        ("class name with a newline", "FastRetrainParams", {"changes": [{"name": "fu\nmerchant"}]}, "changes.0.name"),
        ("refined class ../fu", "FastRetrainParams", {"changes": [{"name": "fu_new", "refines": "../fu"}]},
         "changes.0.refines"),
        ("empty class name", "FastRetrainParams", {"changes": [{"name": ""}]}, "changes.0.name"),
        ("no changes", "FastRetrainParams", {"changes": []}, "changes"),
        ("changes as a string", "FastRetrainParams", {"changes": "fu_merchant"}, "changes"),
        ("infinite canary timeout", "FastRetrainParams", {"canary_timeout_min": float("inf")}, "canary_timeout_min"),
        ("NaN threshold", "FastRetrainParams", {"threshold": float("nan")}, "threshold"),
        ("empty registered model", "ReleaseParams", {"registered_model": ""}, "registered_model"),
        ("fresh_n below its minimum", "ReleaseParams", {"fresh_n": 3}, "fresh_n"),
        ("prune everything", "ReleaseParams", {"prune_amount": 1.0}, "prune_amount"),
        ("version tag of the wrong type", "ReleaseParams", {"version_tags": {"a": 1}}, "version_tags.a"),
        ("infinite canary timeout (release)", "ReleaseParams", {"canary_timeout_min": float("inf")},
         "canary_timeout_min"),
        ("zero workers", "SearchFlowParams", {"workers": 0}, "workers"),
        ("unknown device", "SearchFlowParams", {"device": "gpu0"}, "device"),
        ("study name climbing out of the runs folder", "SearchFlowParams", {"study_name": "../../etc"}, "study_name"),
        ("absolute study name", "SearchFlowParams", {"study_name": "/tmp/elsewhere"}, "study_name"),
        ("infinite search timeout", "SearchFlowParams", {"timeout_min": float("inf")}, "timeout_min"),
        ("threshold as text", "CycleParams", {"threshold": "high"}, "threshold"),
        ("threshold below 0.5", "CycleParams", {"threshold": 0.1}, "threshold"),
        ("infinite cycle search timeout", "CycleParams", {"search_timeout_min": float("inf")}, "search_timeout_min"),
        ("negative max_tasks", "CycleParams", {"max_tasks": -1}, "max_tasks"),
        ("empty reason", "CycleParams", {"reason": ""}, "reason"),
    ]


def _param_models() -> dict[str, Any]:
    from flows.cycle import CycleParams
    from flows.fast_retrain import FastRetrainParams
    from flows.release import ReleaseParams
    from flows.search import SearchFlowParams

    return {m.__name__: m for m in (FastRetrainParams, ReleaseParams, SearchFlowParams, CycleParams)}


def offer_to_flow_params() -> list[Case]:
    """Each malformed parameter set, validated by its flow's parameter model (what Prefect runs first)."""
    from pydantic import ValidationError

    models = _param_models()
    cases = []
    for kind, model, params, field_name in flow_param_attempts():
        try:
            models[model].model_validate(params)
        except ValidationError as exc:
            locs = {".".join(str(p) for p in err["loc"]) for err in exc.errors()}
            text = str(exc)
            ok = field_name in locs and field_name.split(".")[-1] in text
            got = f"refused: {sorted(locs)}: {exc.errors()[0]['msg']}"
        else:
            ok, got = False, "accepted"
        cases.append(Case(kind, f"flow parameters ({model})", f"refused, naming {field_name!r}", got[:200], ok))
    return cases


# ----------------------------------------------------------------------------------- corrupt ONNX


def colour_graph(path: str | Path, classes: list[str] | None = None, weights=None, size: int = MODEL_SIZE,
                 meta: dict[str, str] | None = None, input_type: str = "uint8") -> Path:
    """A tiny ONNX graph with export_onnx's interface: uint8 NHWC `pixels` -> `logits` = mean RGB @ W."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    classes = classes or CLASSES
    w = np.asarray(weights if weights is not None else COLOUR_W, np.float32)
    elem = TensorProto.UINT8 if input_type == "uint8" else TensorProto.FLOAT
    nodes = [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["rgb"], axes=[1, 2], keepdims=0),
             helper.make_node("MatMul", ["rgb", "W"], ["logits"])]
    graph = helper.make_graph(
        nodes, "colour", [helper.make_tensor_value_info("pixels", elem, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", w.shape[1]])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    props = {"classes": json.dumps(classes), "image_size": str(size), "arch": f"colour{len(classes)}"}
    props.update(meta or {})
    helper.set_model_props(model, {k: v for k, v in props.items() if v is not None})
    onnx.save(model, str(path))
    return Path(path)


def corrupt_graphs(folder: Path) -> dict[str, tuple[bytes, str]]:
    """kind -> (the bytes stored as the version's model.onnx, a word the refusal must hold)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = colour_graph(folder / "good.onnx").read_bytes()

    def variant(name: str, **kwargs) -> bytes:
        return colour_graph(folder / f"{name}.onnx", **kwargs).read_bytes()

    return {
        "ONNX: garbage bytes": (b"\x08\x07not an ONNX graph, an upload cut short", "onnxruntime cannot open"),
        "ONNX: truncated upload": (good[: len(good) // 2], "onnxruntime cannot open"),
        "ONNX: empty file": (b"", "onnxruntime cannot open"),
        "ONNX: float input": (variant("float", input_type="float"), "uint8"),
        "ONNX: no class map": (variant("noclasses", meta={"classes": None}), "class map"),
        "ONNX: 3 logits for 2 classes": (variant("wide", weights=[[0, 0, 0.1]] * 3), "logits"),
        "ONNX: image_size not a number": (variant("size-text", meta={"image_size": "large"}), "image_size"),
        "ONNX: image_size beside the graph's input": (variant("size-other", meta={"image_size": "512"}),
                                                      "image_size"),
    }


@contextlib.contextmanager
def project_home(home: Path) -> Iterator[None]:
    """SAOFU_HOME pointed at `home` (the MLflow store, caches), MLFLOW_TRACKING_URI unset, then restored."""
    with environment(SAOFU_HOME=str(home), MLFLOW_TRACKING_URI=None):
        yield


def registry_with_corrupt_versions(home: Path, model: str = "bad-input", kinds: list[str] | None = None,
                                   ) -> tuple[str, dict[str, tuple[str, str]]]:
    """An MLflow store under `home` (SAOFU_HOME must point there): version 1 good, then one version per
    corrupt graph, each registered good and its stored model.onnx overwritten (a corrupt upload).

    Returns:
        (tracking URI, corrupt kind -> (version, a word its refusal must hold)); `kinds` limits the
        corrupt graphs registered (default: all).
    """
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from deploy.model_source import ModelSource
    from tasks.tracking import register_onnx, start_run

    good = colour_graph(home / "good.onnx")
    graphs = {k: v for k, v in corrupt_graphs(home / "graphs").items() if kinds is None or k in kinds}
    versions = {}
    run = start_run("bad-input", "corrupt-onnx", {}, {})
    assert register_onnx(run, good, model, MODEL_SIZE, CLASSES, {}) == "1"
    for kind in graphs:
        versions[kind] = register_onnx(run, good, model, MODEL_SIZE, CLASSES, {})
    uri = f"sqlite:///{home}/mlflow/mlflow.db"
    source = ModelSource(model, tracking_uri=uri, challenger_alias=None)
    for kind, version in versions.items():
        stored = Path(url2pathname(urlparse(source.location(version)).path)) / "model.onnx"
        stored.write_bytes(graphs[kind][0])
    return uri, {kind: (version, graphs[kind][1]) for kind, version in versions.items()}


def offer_corrupt_onnx(uri: str, versions: dict[str, tuple[str, str]], model: str = "bad-input",
                       wait_s: float = 20.0) -> list[Case]:
    """Under the app serving `models:/<model>@champion` from the MLflow store `uri`, move the alias to
    each corrupt version in turn (see `promote_each`).

    Args:
        uri: the store of `registry_with_corrupt_versions`.
        versions: corrupt kind -> (version, a word its refusal must hold).
    """
    from mlflow.tracking import MlflowClient

    from deploy.app import ServeConfig, create_app

    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def promote(version: str) -> None:
        registry.set_registered_model_alias(model, "champion", version)

    promote("1")
    return promote_each(create_app(ServeConfig(model_name=model, tracking_uri=uri, poll_seconds=0.05)), promote,
                        versions, wait_s)


def promote_each(app, promote: Callable[[str], None], versions: dict[str, tuple[str, str]],
                 wait_s: float = 20.0) -> list[Case]:
    """Move the champion alias to each corrupt version under a running app, then back to version 1.

    Each must be refused naming what is wrong, with version 1 still answering and `/healthz`
    saying `degraded` (which version, why); once version 1 is promoted again, `/healthz` is ok.

    Args:
        app: the serving app, its champion alias on version 1 (a good graph).
        promote: moves the champion alias to a version.
        versions: corrupt kind -> (version, a word its refusal must hold).
    """
    from starlette.testclient import TestClient

    red = encoded(Image.new("RGB", (MODEL_SIZE, MODEL_SIZE), RED), "PNG")
    cases = []
    with TestClient(app) as client:
        for kind, (version, word) in versions.items():
            promote(version)
            deadline = time.monotonic() + wait_s
            health = client.get("/healthz").json()
            while (health.get("degraded") or {}).get("alias_version") != version and \
                    health["versions"]["champion"] != version and time.monotonic() < deadline:
                time.sleep(0.02)
                health = client.get("/healthz").json()
            answers = [client.post("/predict", content=red, headers={"content-type": "image/png"}) for _ in range(3)]
            served = {a.json().get("version") if a.status_code == 200 else a.status_code for a in answers}
            degraded = health.get("degraded") or {}
            ok = (health.get("status") == "degraded" and degraded.get("alias_version") == version
                  and degraded.get("served_version") == "1" and served == {"1"} and word in degraded.get("reason", ""))
            cases.append(Case(kind, "deployment", f"refused naming {word!r}; version 1 answers; /healthz degraded",
                              f"status {health.get('status')}, answers from {sorted(map(str, served))}, reason "
                              f"{degraded.get('reason', '')!r}"[:240], ok))
        promote("1")
        deadline = time.monotonic() + wait_s
        while client.get("/healthz").json().get("status") != "ok" and time.monotonic() < deadline:
            time.sleep(0.02)
        health = client.get("/healthz").json()
        cases.append(Case("good version promoted again", "deployment", "/healthz ok", str(health.get("status")),
                          health.get("status") == "ok"))
    return cases


# ----------------------------------------------------------------------------------- all of it


def serving_app_for_corpus(folder: Path):
    """The serving app with the colour graph, from a fixed source (no registry): what the corpus is posted to."""
    from deploy.app import ServeConfig, create_app
    from deploy.model_source import ModelSet, load_model

    class FixedSource:
        loaded = True
        on_change = on_error = None
        degraded = None

        def __init__(self, models: ModelSet):
            self.current = models

        def start(self) -> None:
            if self.on_change is not None:
                self.on_change(None, self.current)

        def stop(self) -> None:
            pass

    folder.mkdir(parents=True, exist_ok=True)
    models = ModelSet(load_model(colour_graph(folder / "colour.onnx"), "bad-input", "1"))
    return create_app(ServeConfig(model_name="bad-input", tracking_uri="sqlite:///unused.db"), FixedSource(models))


def count_kinds(cases: list[Case]) -> int:
    """Distinct bad-input kinds tried (a kind offered to several doors counts once)."""
    return len({c.kind for c in cases if c.kind not in ("healthz after the corpus", "good version promoted again")})


def run_corpus(workdir: str | Path) -> Section:
    """Every bad input offered to every door; the bench's "bad input" section."""
    from starlette.testclient import TestClient

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cases: list[Case] = []
    with TestClient(serving_app_for_corpus(work / "serving")) as client:
        cases += offer_to_serving(client)
    cases += offer_to_flow_params()
    with project_home(work / "home"):
        steps: list[tuple[str, Callable[[], list[Case]]]] = [
            ("ingest", lambda: offer_to_ingest(work / "ingest")),
            ("training", lambda: offer_to_training(work / "training")),
            ("deployment", lambda: offer_corrupt_onnx(*registry_with_corrupt_versions(work / "home"))),
        ]
        for target, step in steps:
            try:
                cases += step()
            except Exception as exc:  # noqa: BLE001 - one door failing to run is a case, not the end of the bench
                cases.append(Case(f"{target} harness", target, "ran", f"{type(exc).__name__}: {exc}"[:240], False))
    return Section("bad input", cases, counts={"bad_input_kinds": count_kinds(cases),
                                               "rows_or_files_lost": sum(c.lost for c in cases)},
                   seconds=time.perf_counter() - started)
