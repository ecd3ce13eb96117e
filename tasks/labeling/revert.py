"""Take auto-labels back: remove every auto-label one model version voted for, as a new data version.

Active learning writes an auto-label as a manifest row with source `auto` and the two model
versions that agreed, `model_versions` = "NAME:VERSION;NAME:VERSION". When one of those versions
turns out to be wrong more often than its threshold promised (an audit of its auto-labels found a
precision below the target), `revert_auto_labels` removes every `auto` row that names it, and the
row's image file, from the dataset; `human` and `generated` rows and every other file are left
byte for byte as they were.

Recorded and reversible: under the dataset's lock, the dataset as it is is kept as a data version
first (the existing one when its content is already versioned), the rows and files are removed in
a hard-linked staged copy, the copy is versioned (its message names the model version, the count
and the version before), and only then swapped in (`tasks.labeling.ingest.commit_staged`), so a
crash at any point leaves the dataset whole, and running the same revert again converges on the
same two versions. `restore_version` puts any data version back in place (the undo).

What becomes of the reverted images: the online pool's state (`tasks/labeling/pool.py`, `auto`
set of sha256) still marks them as handled, so active learning will not label them again, from
this model version or any other. They are not sent anywhere automatically: the result carries
their sha256 (and the files stay in the data version before the revert), so a caller may send
them to labelers.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from saofu.errors import SaofuError
from tasks.data.dataset_lock import dataset_lock, recover_interrupted_swap, staging_dir
from tasks.data.manifest import MANIFEST_NAME, read_manifest, write_manifest
from tasks.data.versions import (
    DATASETS_DIR,
    NAME_RE,
    DataVersion,
    checkout_version,
    content_fingerprint,
    create_version,
    get_version,
    list_versions,
    registry_dir,
)
from tasks.labeling.ingest import commit_staged, discard_staged, staged_copy

# What active learning writes (`ModelRef.model_version`): a registered model's name, a colon, its
# version number. Neither `:` nor `;` in the name: `;` separates the two voters in a row.
MODEL_VERSION_RE = re.compile(r"^(?P<name>[^\s:;]+):(?P<version>[0-9]+)$")
AUTO_SOURCE = "auto"


@dataclass
class RevertResult:
    """What one revert did.

    Attributes:
        model_version: the NAME:VERSION whose auto-labels were taken back.
        dataset_dir: the dataset.
        dataset_name: the name of its data versions.
        removed: manifest rows removed (0: there was nothing to revert, no version was made).
        per_class: removed rows by label.
        version_before: the data version holding the dataset as it was (the undo's target).
        version_after: the data version holding it without those auto-labels.
        removed_paths: the image files removed (relative to the dataset).
        removed_sha256: the removed images' content hashes, e.g. to send them to labelers.
        kept: rows left in the manifest.
    """

    model_version: str
    dataset_dir: str
    dataset_name: str = ""
    removed: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    version_before: str | None = None
    version_after: str | None = None
    removed_paths: list[str] = field(default_factory=list)
    removed_sha256: list[str] = field(default_factory=list)
    kept: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def check_model_version(model_version: str) -> str:
    """`model_version` stripped, if it is NAME:VERSION (e.g. `fu-recognizer:3`).

    Raises:
        SaofuError: anything else, named.
    """
    value = str(model_version).strip()
    if not MODEL_VERSION_RE.match(value):
        raise SaofuError(f"model version {model_version!r} is not NAME:VERSION (e.g. fu-recognizer:3), "
                         "as auto-labels record it in the manifest's model_versions column")
    return value


def auto_labels_by_model(rows: list[dict], model_version: str) -> list[dict]:
    """The `auto` rows whose `model_versions` holds exactly this NAME:VERSION token.

    A whole-token match, never a prefix: `fu:1` does not match a row voted by `fu:10`.
    """
    wanted = check_model_version(model_version)
    return [r for r in rows if r.get("source") == AUTO_SOURCE
            and wanted in {t.strip() for t in (r.get("model_versions") or "").split(";")}]


def dataset_name_for(dataset_dir: str | Path) -> str:
    """The name of a dataset's data versions, derived when the caller gives none.

    In order: the name of a version holding exactly this content; the name whose registry copy
    (its newest version's manifest) shares the most images with this manifest; the folder's name.

    Raises:
        SaofuError: two names share equally many images with it (say which with a name), or
            the folder's name is not a valid data version name.
    """
    root = Path(dataset_dir)
    versions = list_versions()
    if versions:
        fingerprint, _ = content_fingerprint(root)
        exact = [v for v in versions if v.fingerprint == fingerprint]
        if exact:
            return exact[-1].name
        ours = {r.get("sha256") for r in read_manifest(root)}
        overlap = {name: len(ours & _registry_manifest_shas(name)) for name in {v.name for v in versions}}
        best = max(overlap.values(), default=0)
        if best > 0:
            tied = sorted(n for n, c in overlap.items() if c == best)
            if len(tied) > 1:
                raise SaofuError(f"the data versions of {', '.join(tied)} share equally many images with {root}; "
                                 "name the dataset's versions (--name)")
            return tied[0]
    if not NAME_RE.match(root.name):
        raise SaofuError(f"{root} has no data version yet and its folder name is not a valid version name; "
                         "name the dataset's versions (--name)")
    return root.name


def _registry_manifest_shas(name: str) -> set[str]:
    # The registry keeps its workspace copy of each dataset's newest version between versions
    # (tasks/data/versions.py); its manifest says which images that version holds.
    return {r.get("sha256") for r in read_manifest(registry_dir() / DATASETS_DIR / name)}


def revert_auto_labels(dataset_dir: str | Path, model_version: str, dataset_name: str = "",
                       message: str = "") -> RevertResult:
    """Remove every auto-label `model_version` voted for from the dataset, as a new data version.

    Args:
        dataset_dir: the labelled dataset (ImageFolder tree + manifest.csv).
        model_version: NAME:VERSION, e.g. `fu-recognizer:3`.
        dataset_name: the name of its data versions; "" derives it (`dataset_name_for`).
        message: why (e.g. the audit that triggered it), added to the new version's message.

    Returns:
        What was removed and the data versions before and after; `removed` 0 and no new version
        when no auto-label names this model version.

    Raises:
        SaofuError: a malformed model version, no dataset, a row pointing outside the dataset, or
            a data version that could not be made (the dataset is left as it was).
    """
    wanted = check_model_version(model_version)
    root = Path(dataset_dir)
    with dataset_lock(root):
        if not (root / MANIFEST_NAME).is_file():
            raise SaofuError(f"no labelled dataset at {root}: it has no {MANIFEST_NAME}")
        rows = read_manifest(root)
        gone = auto_labels_by_model(rows, wanted)
        result = RevertResult(model_version=wanted, dataset_dir=str(root), dataset_name=dataset_name, kept=len(rows))
        if not gone:
            return result
        name = result.dataset_name = dataset_name or dataset_name_for(root)
        # The undo's target: the dataset as it is, before anything changes (active learning adds
        # auto-labels without a version of their own; the existing version when there is one).
        before = create_version(root, name, f"before reverting the auto-labels of {wanted}")
        staging = staged_copy(root)
        try:
            result.removed_paths = _remove_rows(staging, rows, gone)
            result.version_before = before.id
            result.removed, result.kept = len(gone), len(rows) - len(gone)
            result.per_class = dict(sorted(Counter(r["label"] for r in gone).items()))
            result.removed_sha256 = [r["sha256"] for r in gone]
            counts = ", ".join(f"{k} {v}" for k, v in result.per_class.items())
            note = (f"revert: {result.removed} auto-labels of {wanted} removed ({counts}); "
                    f"before: {before.id}" + (f"; {message}" if message else ""))
            # Versioned before the swap: a crash after it finds the same rows next time, and the
            # same content returns the same version, so a second run converges instead of losing it.
            result.version_after = create_version(staging, name, note).id
            commit_staged(staging, root)
        except BaseException:
            discard_staged(staging)
            raise
    print(f"revert: {result.removed} auto-labels of {wanted} removed from {root} ({result.per_class}); "
          f"data version {result.version_before} -> {result.version_after}", flush=True)
    return result


def _remove_rows(staging: Path, rows: list[dict], gone: list[dict]) -> list[str]:
    """Drop `gone` from the staged manifest, and their files that no remaining row points at.

    The staged copy's files are hard links to the dataset's: unlinking one and rewriting the
    manifest through a rename leave the dataset's own files untouched.
    """
    gone_ids = {id(r) for r in gone}
    remaining = [r for r in rows if id(r) not in gone_ids]
    still_used = {r.get("path") for r in remaining}
    base = staging.resolve()
    removed = []
    for row in gone:
        rel = row.get("path") or ""
        target = staging / rel
        if not rel or not target.resolve().is_relative_to(base) or target.resolve() == base:
            raise SaofuError(f"manifest row {rel!r} ({row.get('sha256')}) points outside the dataset; "
                             "nothing was reverted")
        if rel in still_used or not target.is_file():
            continue
        target.unlink()
        removed.append(rel)
        # An emptied class folder would read as an empty class; the version before keeps it.
        for folder in list(target.parents)[:2]:
            if folder != staging and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    write_manifest(staging, remaining)
    return sorted(removed)


def restore_version(dataset_dir: str | Path, version_id: str, force: bool = False) -> DataVersion:
    """Put a data version back in place of the dataset (e.g. the version before a revert).

    Checked out beside the dataset into its staging folder, then swapped in under the dataset's
    lock, so the dataset is never half restored. Changes made after that version go with it;
    unless `force`, the dataset's current content must be a data version itself, so nothing
    that was never versioned is lost.

    Raises:
        SaofuError: unknown version, or unversioned content and no `force` (nothing changed).
    """
    version = get_version(version_id)
    root = Path(dataset_dir)
    with dataset_lock(root):
        recover_interrupted_swap(root)  # also removes a staging folder a crash left
        if root.exists() and not force:
            fingerprint, _ = content_fingerprint(root)
            if not any(v.fingerprint == fingerprint for v in list_versions()):
                raise SaofuError(f"{root} holds changes that are in no data version; version it first "
                                 f"(or force the restore of {version.id} and lose them)")
        staging = staging_dir(root)
        try:
            checkout_version(version.id, staging)
            commit_staged(staging, root)
        except BaseException:
            discard_staged(staging)
            raise
    return version
