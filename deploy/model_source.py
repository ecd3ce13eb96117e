"""Which graphs the app serves: registry aliases resolved, downloaded, and swapped atomically.

The app reads `ModelSource.current` once per request and uses that `ModelSet` to the end. A
`ModelSet` is immutable; a swap builds a whole new one (sessions created and warmed up first) and
publishes it with one attribute assignment. So a request that started on version 3 finishes on
version 3 even if version 4 is published meanwhile, no request ever sees a half-loaded model, and
the old session is freed when the last request holding it is done (reference counting).

A background thread polls the aliases every `poll_seconds`. Anything that goes wrong there (the
registry unreachable, a version without a usable graph) is logged and reported to `on_error`;
the app keeps serving what it has.

A swap may change the class list (a fast retrain adds `fu_merchant`: 2 classes, then 3): each
`LoadedModel` carries its own classes, and a request answers with the classes of the model set
it read, so no request mixes one version's probabilities with another's class names.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from saofu.errors import SaofuError
from saofu.model_location import version_location

log = logging.getLogger("saofu.serve")

CHAMPION = "champion"
CHALLENGER = "challenger"
RETRY_FAILED_SECONDS = 60.0  # a version that failed to load is tried again after this long


class _FailedRecently(SaofuError):
    """A version that failed to load is not downloaded again on every poll."""


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One registered version, ready to run: its session and what its metadata says.

    The graph is `tasks.train.export.export_onnx`'s: uint8 NHWC RGB `pixels` in, `logits` out, class
    names (JSON) and input size in the ONNX metadata, and optionally `refines` (JSON: new class ->
    the class it refines, e.g. `{"fu_merchant": "fu"}`; {} without it), which the canary uses to
    compare a challenger with a champion that lacks the new class. Names are read from the session
    rather than imported from tasks.train.export, which would pull in torch.
    """

    name: str
    version: str
    session: ort.InferenceSession
    classes: tuple[str, ...]
    image_size: int
    input_name: str
    output_name: str
    path: str
    refines: Mapping[str, str] = field(default_factory=dict)

    @property
    def model_version(self) -> str:
        """`name:version`, as active learning and the manifests name a model."""
        return f"{self.name}:{self.version}"

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Softmax of the graph's logits for uint8 pixels [N,H,W,3] -> float [N,C]."""
        logits = self.session.run([self.output_name], {self.input_name: pixels})[0]
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class ModelSet:
    """What is served right now: the champion, and the challenger when one is set and differs."""

    champion: LoadedModel
    challenger: LoadedModel | None = None
    generation: int = 1  # +1 on every swap

    def versions(self) -> dict[str, str | None]:
        return {
            CHAMPION: self.champion.version,
            CHALLENGER: self.challenger.version if self.challenger else None,
        }


def parse_refines(text: str | None, where: str) -> dict[str, str]:
    """The `refines` metadata entry: JSON {class: the class it refines}; {} when absent or empty.

    (`tasks.release.evaluation.refines_from_metadata` reads the same entry; the app imports no `tasks`.)

    Raises:
        SaofuError: not a JSON object mapping class names to other class names (named by `where`).
    """
    if not text:
        return {}
    try:
        refines = json.loads(text)
    except json.JSONDecodeError:
        refines = None
    if not isinstance(refines, dict) or not all(isinstance(k, str) and isinstance(v, str) and k != v
                                                for k, v in refines.items()):
        raise SaofuError(f"{where}: its `refines` metadata must be a JSON object mapping a class to the class it "
                         f"refines, got {text[:80]!r}")
    return refines


def build_session(onnx_path: str | Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session on `threads` intra-op threads (1: the request is the unit of parallelism)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # onnxruntime's own warnings would go to stderr on every load
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def load_model(onnx_path: str | Path, name: str, version: str, threads: int = 1) -> LoadedModel:
    """Open an exported graph, check its interface, and run it once (first runs allocate).

    Raises:
        SaofuError: no such file, no class map in the metadata (or one whose length is not the
            number of logits), a malformed `refines` entry, or not the uint8 NHWC interface.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise SaofuError(f"{name} version {version}: ONNX model not found at {path}")
    sess = build_session(path, threads)
    meta = sess.get_modelmeta().custom_metadata_map
    if "classes" not in meta:
        raise SaofuError(f"{name} version {version} ({path}) has no class map in its ONNX metadata: "
                         "export it with tasks.train.export.export_onnx")
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    if inp.type != "tensor(uint8)" or len(inp.shape) != 4 or inp.shape[3] != 3:
        raise SaofuError(f"{name} version {version} takes {inp.type} {inp.shape}; the serving app needs "
                         "uint8 [N,H,W,3] pixels (tasks.train.export.export_onnx's interface)")
    size = int(meta.get("image_size", inp.shape[1] if isinstance(inp.shape[1], int) else 64))
    model = LoadedModel(
        name=name, version=str(version), session=sess, classes=tuple(json.loads(meta["classes"])),
        image_size=size, input_name=inp.name, output_name=out.name, path=str(path),
        refines=parse_refines(meta.get("refines"), f"{name} version {version} ({path})"),
    )
    width = model.probabilities(np.zeros((1, size, size, 3), np.uint8)).shape[1]
    if width != len(model.classes):
        # A class-count change (2 -> 3 classes) must come with its own class list, or every answer
        # would name the wrong class: refuse the version, the app keeps serving what it has.
        raise SaofuError(f"{name} version {version} ({path}) outputs {width} logits but its metadata lists "
                         f"{len(model.classes)} classes {list(model.classes)}")
    return model


class ModelSource:
    """`models:/<name>@champion` (and `@challenger`), kept current by a polling thread.

    Args:
        model_name: the registered model.
        tracking_uri: MLflow store (default: the project's, `saofu.settings`).
        champion_alias: alias that answers requests.
        challenger_alias: alias of the canary's challenger; None never loads one.
        poll_seconds: how often the aliases are checked.
        threads: intra-op threads per session.
        cache_dir: where graphs are downloaded (default: MLflow's choice; a local store's file is
            used in place).
        on_change: called as on_change(old, new) after each swap (old is None on the first load).
        on_error: called as on_error(what, exception) when a check or a load fails.
    """

    def __init__(
        self, model_name: str, *, tracking_uri: str | None = None, champion_alias: str = CHAMPION,
        challenger_alias: str | None = CHALLENGER, poll_seconds: float = 5.0, threads: int = 1,
        cache_dir: str | Path | None = None,
        on_change: Callable[[ModelSet | None, ModelSet], None] | None = None,
        on_error: Callable[[str, BaseException], None] | None = None,
    ):
        if poll_seconds <= 0:
            raise SaofuError(f"poll_seconds must be positive, got {poll_seconds}")
        if challenger_alias == champion_alias:
            raise SaofuError(f"the challenger alias must differ from the champion's ({champion_alias!r})")
        if tracking_uri is None:
            from saofu.settings import get_settings

            tracking_uri = get_settings().tracking_uri
        self.model_name = model_name
        self.tracking_uri = tracking_uri
        self.champion_alias = champion_alias
        self.challenger_alias = challenger_alias
        self.poll_seconds = poll_seconds
        self.threads = threads
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.on_change = on_change
        self.on_error = on_error
        self._current: ModelSet | None = None
        self._failed: dict[str, float] = {}  # version -> when it last failed to load
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None
        self.last_error: str | None = None  # why the champion could not be loaded yet (wait mode)

    # ------------------------------------------------------------------------------ reading

    @property
    def current(self) -> ModelSet:
        """The published model set; read it once per request and keep using that object."""
        current = self._current
        if current is None:
            raise SaofuError("no model loaded yet: call ModelSource.load() or start() first")
        return current

    @property
    def loaded(self) -> bool:
        return self._current is not None

    # ------------------------------------------------------------------------------ registry

    def _registry(self):
        """A client of `tracking_uri` for tracking and registry alike (never MLflow's global store).

        Raises:
            SaofuError: a SQLite store that does not exist (serving from the wrong folder would
                otherwise create an empty one and report a missing model).
        """
        if self._client is None:
            from mlflow.tracking import MlflowClient

            if self.tracking_uri.startswith("sqlite:///"):
                db = Path(self.tracking_uri.removeprefix("sqlite:///"))
                if not db.is_file():
                    raise SaofuError(f"no MLflow store at {db}: run from the project folder or set SAOFU_HOME "
                                     "(or MLFLOW_TRACKING_URI)")
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def resolve(self, alias: str) -> str | None:
        """The version `alias` points at now; None when the alias (or the model) does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self._registry().get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def location(self, version: str) -> str:
        """The concrete artefact URI of version `version`, resolved through this source's client."""
        return version_location(self._registry(), self.model_name, version)

    def download(self, version: str) -> Path:
        """The local path of version `version`'s model.onnx (downloaded if the store is remote)."""
        import mlflow

        dst = self.cache_dir / f"{self.model_name}-v{version}" if self.cache_dir else None
        if dst is not None:
            dst.mkdir(parents=True, exist_ok=True)
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"{self.location(version).rstrip('/')}/model.onnx", dst_path=str(dst) if dst else None,
            tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri,
        ))
        return local / "model.onnx" if local.is_dir() else local

    def _obtain(self, version: str, current: ModelSet | None) -> LoadedModel:
        """A loaded model for `version`: reused from the current set when it is there already.

        Promoting the challenger to champion therefore swaps in the very session the canary used.
        """
        if current is not None:
            for model in (current.champion, current.challenger):
                if model is not None and model.version == version:
                    return model
        failed_at = self._failed.get(version)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_SECONDS:
            raise _FailedRecently(f"{self.model_name} version {version} failed to load recently; retrying later")
        try:
            model = load_model(self.download(version), self.model_name, version, self.threads)
        except Exception:
            self._failed[version] = time.monotonic()
            raise
        self._failed.pop(version, None)
        return model

    # ------------------------------------------------------------------------------ swapping

    def load(self) -> ModelSet:
        """Resolve the aliases and publish the first model set (blocking).

        Raises:
            SaofuError: the champion alias is not set, or its version has no usable graph.
        """
        version = self.resolve(self.champion_alias)
        if version is None:
            raise SaofuError(
                f"registered model {self.model_name!r} has no alias {self.champion_alias!r} (or no such model) "
                f"in {self.tracking_uri}: promote a version, e.g. "
                f"`saofu promote {self.model_name} VERSION --reason ...`"
            )
        self.refresh()
        return self.current

    def refresh(self) -> bool:
        """Check the aliases once; build and publish a new set if either moved.

        A challenger that fails to load is left out (reported to on_error) rather than holding
        back a champion swap. A champion alias that disappeared keeps the current champion.

        Returns:
            Whether a new set was published.
        """
        with self._refresh_lock:
            current = self._current
            champion_v = self.resolve(self.champion_alias)
            if champion_v is None:
                if current is None:
                    return False
                raise SaofuError(f"alias {self.champion_alias!r} of {self.model_name!r} disappeared; "
                                 f"still serving version {current.champion.version}")
            challenger_v = self.resolve(self.challenger_alias) if self.challenger_alias else None
            if challenger_v == champion_v:
                challenger_v = None
            if current is not None and current.versions() == {CHAMPION: champion_v, CHALLENGER: challenger_v}:
                return False
            champion = self._obtain(champion_v, current)
            challenger = None
            if challenger_v is not None:
                try:
                    challenger = self._obtain(challenger_v, current)
                except _FailedRecently:
                    pass  # reported when it failed; tried again after RETRY_FAILED_SECONDS
                except Exception as exc:  # noqa: BLE001 - reported, the champion is still swapped in
                    self._report(f"loading challenger version {challenger_v}", exc)
            new = ModelSet(champion, challenger, generation=current.generation + 1 if current else 1)
            if current is not None and new.versions() == current.versions():
                return False
            self._current = new  # the one publishing step: a single reference assignment
        log.info("serving %s champion v%s%s", self.model_name, champion.version,
                 f", challenger v{challenger.version}" if challenger else "")
        if self.on_change is not None:
            self.on_change(current, new)
        return True

    def _report(self, what: str, exc: BaseException) -> None:
        log.warning("model source: %s failed: %s", what, exc)
        if self.on_error is not None:
            self.on_error(what, exc)

    # ------------------------------------------------------------------------------ polling

    def start(self, wait_for_champion: bool = False) -> None:
        """Load (if not loaded yet) and start the polling thread.

        Args:
            wait_for_champion: when the champion cannot be loaded yet (no alias, no store yet),
                start polling anyway instead of raising: the first poll that finds the alias
                publishes it (`saofu up` starts the app before any model is promoted).
        """
        if not self.loaded:
            try:
                self.load()
            except Exception as exc:
                if not wait_for_champion:
                    raise
                self.last_error = str(exc)
                log.warning("no champion to serve yet (%s); checking every %ss", exc, self.poll_seconds)
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="saofu-model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
                if not self.loaded and self.champion_alias:
                    self.last_error = f"registered model {self.model_name!r} has no alias {self.champion_alias!r} yet"
            except _FailedRecently:
                pass
            except Exception as exc:  # noqa: BLE001 - the poller must outlive any registry hiccup
                if not self.loaded:
                    self.last_error = str(exc)
                self._report("checking the aliases", exc)
