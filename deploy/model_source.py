"""Which graphs the app serves: registry aliases resolved, downloaded, and swapped atomically.

The app reads `ModelSource.current` once per request and uses that `ModelSet` to the end. A
`ModelSet` is immutable; a swap builds a whole new one (sessions created and warmed up first) and
publishes it with one attribute assignment. So a request that started on version 3 finishes on
version 3 even if version 4 is published meanwhile, no request ever sees a half-loaded model, and
the old session is freed when the last request holding it is done (reference counting).

A background thread polls the aliases every `poll_seconds`. Anything that goes wrong there (the
registry unreachable, a version without a usable graph) is logged and reported to `on_error`;
the app keeps serving what it has.

A version is refused at load, before it can answer, when its class list does not name exactly
the logits its warm-up run gives; the app keeps serving what it has and `/healthz` says
`degraded`. The last champion that loaded and warmed up is copied to `last_good_dir`: a start
while the alias points at a version that cannot be loaded (a broken graph, the registry
unreachable) serves that copy, loudly, instead of not starting. Every download goes into a folder
of its own, removed when the download or the load fails and once no served model needs it.

A swap may change the class list (a fast retrain adds `fu_merchant`: 2 classes, then 3): each
`LoadedModel` carries its own classes, and a request answers with the classes of the model set
it read, so no request mixes one version's probabilities with another's class names.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from deploy.loaded_model import (  # noqa: F401 - re-exported: the app and tests import them from here
    CHALLENGER,
    CHAMPION,
    LoadedModel,
    ModelSet,
    _short,
    build_session,
    load_model,
    parse_classes,
    parse_refines,
)
from saofu.errors import SaofuError
from saofu.model_location import version_location
from saofu.urls import hide_password

log = logging.getLogger("saofu.serve")

RETRY_FAILED_SECONDS = 60.0  # a version that failed to load is tried again after this long
LAST_GOOD_RECORD = "last-good.json"  # in <last_good_dir>/<model>/, beside the graph it names


class _FailedRecently(SaofuError):
    """A version that failed to load is not downloaded again on every poll."""


class _Refused(SaofuError):
    """The champion alias names a version that cannot be served; the current one is kept (logged once)."""


def _safe_name(name: str) -> str:
    """`name` as one folder name (a hash keeps two names that differ only in odd characters apart)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"
    return safe if safe == name else f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `path` under a private name, then rename: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ModelSource:
    """`models:/<name>@champion` (and `@challenger`), kept current by a polling thread.

    Args:
        model_name: the registered model.
        tracking_uri: MLflow store (default: the project's, `saofu.settings`).
        champion_alias: alias that answers requests.
        challenger_alias: alias of the canary's challenger; None never loads one.
        poll_seconds: how often the aliases are checked.
        threads: intra-op threads per session.
        cache_dir: where this source makes its download folder (default: the system's temporary
            folder). Each version is downloaded into a folder of its own there, removed when the
            download or the load fails and once no served model uses it; the whole folder goes at
            `stop()`.
        last_good_dir: where the last champion that loaded and warmed up is copied
            (`<last_good_dir>/<model>/`: its ONNX and `last-good.json`), and served from when the
            champion cannot be loaded at start; None keeps no copy.
        on_change: called as on_change(old, new) after each swap (old is None on the first load).
        on_error: called as on_error(what, exception) when a check or a load fails.
    """

    def __init__(
        self, model_name: str, *, tracking_uri: str | None = None, champion_alias: str = CHAMPION,
        challenger_alias: str | None = CHALLENGER, poll_seconds: float = 5.0, threads: int = 1,
        cache_dir: str | Path | None = None, last_good_dir: str | Path | None = None,
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
        self.last_good_dir = Path(last_good_dir) if last_good_dir else None
        self._downloads: Path | None = None  # this source's download folder, made at the first download
        self._remove_downloads: weakref.finalize | None = None
        self.on_change = on_change
        self.on_error = on_error
        self._current: ModelSet | None = None
        self._failed: dict[str, float] = {}  # version -> when it last failed to load
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # `check_soon`: the poller checks at once instead of at its next tick
        self._thread: threading.Thread | None = None
        self._client = None
        self.last_error: str | None = None  # why the champion could not be loaded yet (wait mode)
        # Set while the champion alias names a version that is not served: what is served, and why.
        self.degraded: dict | None = None

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
        """The local path of version `version`'s model.onnx, downloaded into a new folder of its own.

        Even a local store's file is copied: the folder is what the source cleans, whatever the
        store. A download that fails (the registry unreachable half-way) leaves nothing behind.
        """
        import mlflow

        folder = Path(tempfile.mkdtemp(prefix=f"v{_safe_name(version)}-", dir=self._downloads_root()))
        try:
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{self.location(version).rstrip('/')}/model.onnx", dst_path=str(folder),
                tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri,
            ))
            path = local / "model.onnx" if local.is_dir() else local
            if not path.resolve().is_relative_to(folder.resolve()):
                raise SaofuError(f"{self.model_name} version {version} was not downloaded into {folder} but {path}")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return path

    def _downloads_root(self) -> Path:
        if self._downloads is None or not self._downloads.is_dir():
            if self.cache_dir is not None:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
            root = Path(tempfile.mkdtemp(prefix=f"saofu-serve-{_safe_name(self.model_name)}-", dir=self.cache_dir))
            # Removed at stop(), or when the source is collected or the interpreter exits.
            self._remove_downloads = weakref.finalize(self, shutil.rmtree, str(root), True)
            self._downloads = root
        return self._downloads

    def _download_folder(self, path: str | Path) -> Path | None:
        """The per-download folder holding `path`; None for a file that is not a download of this source."""
        if self._downloads is None:
            return None
        try:
            rel = Path(path).relative_to(self._downloads)
        except ValueError:
            return None
        return self._downloads / rel.parts[0] if len(rel.parts) > 1 else None

    def _prune_downloads(self, keep: ModelSet | None) -> None:
        """Remove every download folder no model of `keep` was loaded from."""
        if self._downloads is None or not self._downloads.is_dir():
            return
        used = {self._download_folder(m.path) for m in (keep.champion, keep.challenger) if m is not None} \
            if keep is not None else set()
        for folder in self._downloads.iterdir():
            if folder not in used:
                shutil.rmtree(folder, ignore_errors=True)

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
            path = self.download(version)
            try:
                model = load_model(path, self.model_name, version, self.threads)
            except BaseException:
                folder = self._download_folder(path)
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                raise
        except Exception:
            self._failed[version] = time.monotonic()
            raise
        self._failed.pop(version, None)
        return model

    # ------------------------------------------------------------------------------ swapping

    def load(self) -> ModelSet:
        """Resolve the aliases and publish the first model set (blocking).

        When the champion's version cannot be loaded (or the registry not read) and a
        last-known-good copy exists, that copy is served and `degraded` says so; the poll goes on
        trying the alias.

        Raises:
            SaofuError: the champion alias is not set, or its version has no usable graph and
                there is no last-known-good copy to serve instead.
        """
        try:
            version = self.resolve(self.champion_alias)
        except Exception as exc:
            if self._fall_back(None, exc):
                return self.current
            raise
        if version is None:  # nothing promoted: a copy of an earlier champion is no stand-in for that
            raise SaofuError(
                f"registered model {self.model_name!r} has no alias {self.champion_alias!r} (or no such model) "
                f"in {hide_password(str(self.tracking_uri))}: promote a version, e.g. "
                f"`saofu promote {self.model_name} VERSION --reason ...`"
            )
        try:
            self.refresh()
        except Exception as exc:
            if self._fall_back(version, exc):
                return self.current
            raise
        return self.current

    def refresh(self) -> bool:
        """Check the aliases once; build and publish a new set if either moved.

        A challenger that fails to load is left out (reported to on_error) rather than holding
        back a champion swap. A champion alias that disappeared keeps the current champion, and so
        does one naming a version that cannot be loaded (`degraded` says which and why).

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
                if self.degraded is not None:
                    log.warning("the %r alias of %s names version %s again, the one served: no longer degraded",
                                self.champion_alias, self.model_name, champion_v)
                    self.degraded = None
                return False
            try:
                champion = self._obtain(champion_v, current)
            except _FailedRecently:
                raise
            except Exception as exc:
                if current is None:
                    raise  # the first load: load() falls back to the last-known-good copy, or fails
                self._degrade(current.champion, champion_v, exc)
                log.error("refusing %s version %s (alias %r): %s; still serving version %s",
                          self.model_name, champion_v, self.champion_alias, _short(exc), current.champion.version)
                raise _Refused(f"{self.model_name} version {champion_v} (alias {self.champion_alias!r}) cannot "
                               f"be served: {_short(exc)}; still serving version {current.champion.version}") from exc
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
            if self.degraded is not None:
                log.warning("serving %s version %s, as the %r alias names: no longer degraded", self.model_name,
                            champion.version, self.champion_alias)
                self.degraded = None
            if current is None or champion is not current.champion:
                self._save_last_good(champion)
            self._prune_downloads(new)
        log.info("serving %s champion v%s%s", self.model_name, champion.version,
                 f", challenger v{challenger.version}" if challenger else "")
        if self.on_change is not None:
            self.on_change(current, new)
        return True

    # ------------------------------------------------------------------------------ last-known-good

    def _last_good_folder(self) -> Path | None:
        return self.last_good_dir / _safe_name(self.model_name) if self.last_good_dir is not None else None

    def _is_last_good_copy(self, model: LoadedModel) -> bool:
        folder = self._last_good_folder()
        return folder is not None and Path(model.path).parent == folder

    def _save_last_good(self, model: LoadedModel) -> None:
        """Copy a champion that loaded and warmed up to the last-known-good folder (atomically).

        `last-good.json` is written last and names the graph, so a reader sees the old copy or the
        whole new one. A failure is logged, never raised: the swap itself has succeeded.
        """
        folder = self._last_good_folder()
        if folder is None or self._is_last_good_copy(model):
            return
        try:
            data = Path(model.path).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            record_path = folder / LAST_GOOD_RECORD
            if record_path.is_file():
                old = json.loads(record_path.read_text())
                if old.get("version") == model.version and old.get("sha256") == digest:
                    return
            folder.mkdir(parents=True, exist_ok=True)
            name = f"v{_safe_name(model.version)}-{digest[:12]}.onnx"
            # Two apps serving one model from one SAOFU_HOME: one writer at a time, or one could
            # delete the graph the other's record has just named.
            with open(folder / ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                _write_atomic(folder / name, data)
                record = {"model": model.name, "version": model.version, "onnx": name, "sha256": digest,
                          "classes": list(model.classes), "image_size": model.image_size,
                          "saved_at": datetime.now(UTC).isoformat(timespec="seconds")}
                _write_atomic(record_path, json.dumps(record, indent=1).encode())
                for other in folder.glob("*.onnx"):
                    if other.name != name:
                        other.unlink(missing_ok=True)
        except (OSError, ValueError) as exc:
            log.warning("could not keep %s version %s as the last-known-good copy in %s: %s", model.name,
                        model.version, folder, exc)
            return
        log.info("last-known-good copy of %s: version %s (%s)", model.name, model.version, folder / name)

    def _load_last_good(self) -> LoadedModel | None:
        """The last-known-good copy, loaded and warmed up; None when there is none.

        Raises:
            SaofuError: a copy whose record or graph is damaged, or that fails to load.
        """
        folder = self._last_good_folder()
        if folder is None or not (folder / LAST_GOOD_RECORD).is_file():
            return None
        try:
            record = json.loads((folder / LAST_GOOD_RECORD).read_text())
            path = folder / Path(str(record["onnx"])).name
            version = str(record["version"])
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SaofuError(f"the last-known-good record in {folder} cannot be read: {exc}") from None
        if digest != record.get("sha256"):
            raise SaofuError(f"the last-known-good graph {path} does not match its recorded sha256")
        return load_model(path, self.model_name, version, self.threads)

    def _fall_back(self, alias_version: str | None, exc: BaseException) -> bool:
        """Publish the last-known-good copy because the champion could not be loaded at start.

        Returns:
            Whether a model set is published now (the copy, or one published meanwhile).
        """
        if self.last_good_dir is None:
            return False
        try:
            model = self._load_last_good()
        except Exception as lg_exc:  # noqa: BLE001 - the original error is what the caller raises
            log.error("the champion of %s cannot be loaded (%s) and its last-known-good copy cannot either: %s",
                      self.model_name, _short(exc), _short(lg_exc))
            return False
        if model is None:
            log.info("the champion of %s cannot be loaded (%s) and there is no last-known-good copy in %s",
                      self.model_name, _short(exc), self._last_good_folder())
            return False
        with self._refresh_lock:
            if self._current is not None:
                return True
            new = ModelSet(model, None, generation=1)
            self._current = new
            self._degrade(model, alias_version, exc)
        if alias_version is not None:
            self._failed.setdefault(alias_version, time.monotonic())
        log.warning(
            "DEGRADED: %s alias %r -> version %s cannot be served (%s); serving the last-known-good copy, version "
            "%s (%s), until the alias names a version that loads", self.model_name, self.champion_alias,
            alias_version if alias_version is not None else "unknown (registry not read)", _short(exc),
            model.version, model.path)
        self._report("loading the champion at start", exc)
        if self.on_change is not None:
            self.on_change(None, new)
        return True

    def _degrade(self, served: LoadedModel, alias_version: str | None, exc: BaseException) -> None:
        self.degraded = {
            "served_version": served.version,
            "served_from": "last-good" if self._is_last_good_copy(served) else "previous",
            "alias": self.champion_alias,
            "alias_version": alias_version,
            "reason": _short(exc),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }

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

    def check_soon(self) -> None:
        """Have the polling thread check the aliases now rather than at its next tick.

        The release calls it (through the app's `POST /refresh`) right after it moves an alias, so a
        promotion is served within a load, not up to `poll_seconds` later. Nudges that arrive while
        a check runs fold into one more check: a flood of them costs what polling continuously would.
        """
        self._wake.set()

    def stop(self) -> None:
        """Stop polling and remove this source's downloads (loaded sessions keep running)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._remove_downloads is not None:
            self._remove_downloads()
            self._remove_downloads = self._downloads = None

    def _poll(self) -> None:
        while True:
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
                if not self.loaded and self.champion_alias:
                    self.last_error = f"registered model {self.model_name!r} has no alias {self.champion_alias!r} yet"
            except _FailedRecently:
                pass
            except _Refused as exc:  # logged where it was refused
                if self.on_error is not None:
                    self.on_error("loading the champion", exc)
            except Exception as exc:  # noqa: BLE001 - the poller must outlive any registry hiccup
                if not self.loaded:
                    self.last_error = str(exc)
                self._report("checking the aliases", exc)
