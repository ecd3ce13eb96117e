"""The labelled dataset a registered model's scheduled flows work on when the user named none.

The scheduled ingest, active learning and nightly cycle (flows/deployments.py) run with no dataset
named, and resolve one at run time (a champion may appear after the executor started):

1. `<SAOFU_HOME>/data/labelled`, when it holds a manifest (e.g. `saofu data generate --out` there);
2. the champion's training data, when it is a labelled dataset (has a manifest): the champion
   version, or for a release artefact the trained version behind it (tag `parent_version`), read
   from its `data_dir` tag or its run's `data_dir` parameter (no checkpoint is downloaded);
3. the labelled copy of that data, `<SAOFU_HOME>/data/<name>-labelled`, which the first fast
   retrain makes of a plain ImageFolder (what `saofu demo` trains on).

Nothing found is not an error here: the caller gets None and a reason that says what to run.
Beside it, the two other things a scheduled run needs before it can do anything, each answered
without side effects: the online pool (where `saofu serve` logs by default) and the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saofu.errors import SaofuError
from saofu.settings import get_settings
from tasks.data.manifest import MANIFEST_NAME

LABELLED_COPY_SUFFIX = "-labelled"


@dataclass(frozen=True)
class ProjectDataset:
    """The resolved dataset (None: there is none yet) and, either way, one line saying why."""

    path: str | None
    reason: str


def is_labelled(folder: str | Path) -> bool:
    """A labelled dataset: an ImageFolder tree with `manifest.csv` beside it.

    A dataset a crash left only as `.previous` (half-swapped) is put back first: otherwise a
    scheduled run would find no dataset and nothing would ever take its lock to repair it.
    """
    from tasks.data.dataset_lock import repair_if_interrupted

    repair_if_interrupted(folder)
    return (Path(folder) / MANIFEST_NAME).is_file()


def labelled_copy_dir(data_dir: str | Path) -> Path:
    """Where the labelled copy of the plain ImageFolder `data_dir` lives (made by the fast retrain)."""
    return get_settings().data_dir / f"{Path(data_dir).name}{LABELLED_COPY_SUFFIX}"


def default_pool_dir() -> Path:
    """The online pool `saofu serve` logs requests into by default (deploy/server.py default_pool_dir)."""
    return get_settings().online_pool_dir


def pool_missing(pool_dir: str | Path) -> str | None:
    """Why `pool_dir` has nothing for active learning yet (no folder, no request logged), or None."""
    from tasks.data.stream import INDEX_NAME  # tasks.data.stream pulls in the renderer: only when asked

    pool = Path(pool_dir)
    if not pool.is_dir():
        return (f"no online pool at {pool} yet: it fills when the serving app answers requests "
                "(`saofu up serving`, or `saofu serve`)")
    if not (pool / INDEX_NAME).is_file():
        return f"the online pool {pool} has no request logged yet (no {INDEX_NAME}): send the serving app images"
    return None


def no_store() -> str | None:
    """Why the project has no registry yet, or None when it may have one.

    A SQLite store that does not exist holds no model; opening it would create an empty one as a
    side effect of a scheduled check (as the serving app refuses to: deploy/model_source.py).
    """
    uri = get_settings().tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return f"no MLflow store at {uri.removeprefix('sqlite:///')} yet"
    return None


def champion_data_dir(registered_model: str) -> tuple[str | None, str]:
    """The folder the champion of `registered_model` was trained on, read from the registry only.

    Returns:
        (the folder, "") or (None, why not: no store, no champion, a lineage without a data_dir).
    """
    if reason := no_store():
        return None, reason
    # here, not at the top: tasks.release.steps loads torch, which flows.ingest must not at import
    from tasks import tracking
    from tasks.release import registry
    from tasks.release.steps import ARTEFACT_TAG

    try:
        champion = registry.current_champion(registered_model)
    except SaofuError as exc:  # the registered model does not exist
        return None, str(exc)
    if not champion:
        return None, f"registered model {registered_model!r} has no champion yet"
    client = tracking.client()
    tags = client.get_model_version(registered_model, champion).tags or {}
    trained = tags.get("parent_version") if ARTEFACT_TAG in tags else champion
    if not trained:
        return None, f"{registered_model} v{champion} is a release artefact without a parent_version tag"
    mv = client.get_model_version(registered_model, trained)
    data_dir = (mv.tags or {}).get("data_dir") or client.get_run(mv.run_id).data.params.get("data_dir", "")
    if not data_dir:
        return None, f"{registered_model} v{trained} (behind champion v{champion}) records no data_dir"
    return data_dir, ""


def resolve_project_dataset(registered_model: str) -> ProjectDataset:
    """The labelled dataset `registered_model`'s scheduled flows work on (see the module's order).

    Args:
        registered_model: the MLflow registered model whose champion's data is the fallback.

    Returns:
        ProjectDataset(path, how it was found) or ProjectDataset(None, why none and what to run).
    """
    labelled = get_settings().labelled_dir
    if is_labelled(labelled):
        return ProjectDataset(str(labelled), f"{labelled} (has a {MANIFEST_NAME})")
    data_dir, why = champion_data_dir(registered_model)
    if data_dir is None:
        return ProjectDataset(None, f"no labelled dataset: {labelled} has no {MANIFEST_NAME} and {why}; "
                                    "release a model (`saofu release`) and run a fast retrain (`saofu fast-retrain`), "
                                    f"or make one with `saofu data generate --out {labelled}`")
    if is_labelled(data_dir):
        return ProjectDataset(data_dir, f"the champion's training data {data_dir}")
    copy = labelled_copy_dir(data_dir)
    if is_labelled(copy):
        return ProjectDataset(str(copy), f"the labelled copy {copy} of the champion's training data")
    return ProjectDataset(None, f"no labelled dataset: the champion's training data {data_dir} is a plain "
                                f"ImageFolder and its labelled copy {copy} does not exist yet; run a fast retrain "
                                "(`saofu fast-retrain`, it makes the copy) or name a dataset")
