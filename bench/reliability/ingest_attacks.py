"""Ingest's bad input: path, split and label attacks, unknown labels, duplicate tasks, empty
exports and a batch of broken images, offered to the real ingest code (`offer_to_ingest`); nothing
already in the dataset may be lost or changed."""


from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from bench.reliability.bad_images import CLASSES, good_images, image_corpus
from bench.reliability.section import Case


def _annotated(task_id: int, path: str, label: str = "fu", annotations: int = 1, **data) -> dict:
    """A task as Label Studio's API returns it (the project export `completed_annotations` reads)."""
    when = "2026-11-25T10:00:00+00:00"
    result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
    return {"id": task_id, "data": {"image": "/data/local-files/?d=x.png", "path": path, "source": "online_pool",
                                    "badcase": False, **data},
            "annotations": [{"id": task_id * 10 + k, "completed_by": 1, "result": result, "was_cancelled": False,
                             "created_at": when, "updated_at": when} for k in range(annotations)]}


def _export(tasks: list[dict]) -> list[dict]:
    """`completed_annotations` over a stand-in Label Studio holding `tasks`: what the ingest reads."""
    from tasks.labeling.client import completed_annotations

    client = SimpleNamespace(
        users=SimpleNamespace(list=lambda: [SimpleNamespace(id=1, username="ann", email="")]),
        projects=SimpleNamespace(exports=SimpleNamespace(
            download_sync=lambda *_, **__: iter([json.dumps(tasks).encode()]))),
    )
    return completed_annotations(client, project_id=1)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256), and every manifest row by its key."""
    from tasks.data.manifest import read_manifest

    files = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")
             and ".ingest" not in p.parts and p.name != "manifest.csv"}
    rows = {f"row:{r['path']}": json.dumps(r, sort_keys=True) for r in read_manifest(folder)}
    return {**files, **rows}


def lost_since(before: dict[str, str], after: dict[str, str]) -> int:
    """Files and manifest rows of `before` missing or changed in `after` (additions are not losses).

    A row counts as kept when every column it had still holds its value (a batch adding a column
    fills it with "" in the older rows).
    """
    def kept(key: str, value: str) -> bool:
        if key not in after:
            return False
        if not key.startswith("row:"):
            return after[key] == value
        old, new = json.loads(value), json.loads(after[key])
        return all(new.get(column) == v for column, v in old.items())

    return sum(1 for key, value in before.items() if not kept(key, value))


def ingest_batch(dataset: Path, records: list[dict], roots: list[Path], classes: list[str]):
    """What the ingest flow does with one export (flows.ingest: to_manifest_rows, then add_validated).

    The staged copy, the rows added to it, the validation suite, then the copy swapped in or
    discarded; without Prefect and MLflow, which add nothing to what is stored.

    Returns:
        (report, added rows, validation report or None, the error raised or None).
    """
    from tasks.data.manifest import add_images
    from tasks.data.validation import validate_dataset
    from tasks.labeling.ingest import commit_staged, discard_staged, staged_copy, to_manifest_rows

    rows, report = to_manifest_rows(records, roots=roots, classes=classes)
    with _dataset_lock(dataset):  # as the flow holds it, from the staged copy to the swap
        staging = staged_copy(dataset)
        validation = None
        try:
            added = add_images(staging, rows)
            validation = validate_dataset(staging, classes=classes)
            if not validation.success:
                from saofu.errors import SaofuError

                raise SaofuError(f"ingest rejected by the data validation suite:\n{validation.summary()}")
            commit_staged(staging, dataset)
        except Exception as exc:  # noqa: BLE001 - the flow raises it; here it is the outcome to judge
            discard_staged(staging)
            return report, [], validation, exc
    return report, added, validation, None


def _dataset_lock(dataset: Path) -> contextlib.AbstractContextManager:
    try:
        from tasks.data.dataset_lock import dataset_lock
    except ImportError:  # a tree from before the dataset lock: the staged copy needs none there
        return contextlib.nullcontext()
    return dataset_lock(dataset)


def offer_to_ingest(workdir: str | Path) -> list[Case]:
    """Path, split and label attacks, unknown labels, duplicate tasks, an empty export and the image
    corpus, each offered to the ingest of a dataset that already holds images.

    Every case's `lost` counts the dataset's earlier files and manifest rows missing or changed
    after it.
    """
    from tasks.data.image_facts import read_image_facts
    from tasks.data.manifest import add_images
    from tasks.data.validation import DatasetBounds
    from tasks.labeling.ingest import to_manifest_rows

    work = Path(workdir)
    pool, outside, dataset = work / "online_pool", work / "outside", work / "dataset"
    for folder in (pool, outside):
        folder.mkdir(parents=True, exist_ok=True)
    seed = work / "seed"
    good_images(seed, n=4)
    add_images(dataset, [{"image": str(p), "label": p.parent.name, "source": "human", "split": "train"}
                         for p in sorted(seed.rglob("*.png"))])
    roots = [pool.resolve()]

    def pooled(name: str, colour: tuple[int, int, int]) -> Path:
        path = pool / name
        Image.new("RGB", (24, 24), colour).save(path)
        return path

    cases: list[Case] = []

    # 1. Attacks, unknown labels and duplicates in one export, with good tasks beside them.
    secret = outside / "secret.png"
    Image.new("RGB", (24, 24), (1, 2, 3)).save(secret)
    (pool / "link.png").symlink_to(secret)
    good, twin = pooled("good.png", (200, 30, 30)), pooled("twin.png", (30, 200, 30))
    (pool / "twin-copy.png").write_bytes(twin.read_bytes())
    already = next(iter(sorted((dataset / "train" / "fu").glob("*.png"))))
    (pool / "already.png").write_bytes(already.read_bytes())
    evil = work / "evil"
    attacks = {  # kind -> (task ids, a word the skip reason must hold)
        "path attack: absolute path outside the roots": ([2], "/etc/passwd"),
        "path attack: relative path": ([3], "'../../x.png'"),
        "path attack: .. climbing out of the pool": ([4], "outside"),
        "path attack: symlink out of the pool": ([5], "outside"),
        "path attack: NUL byte in the path": ([6], "cannot be resolved"),
        "split attack: absolute folder": ([7], str(evil)),
        "split attack: ../": ([8], "'../x'"),
        "split attack: unknown split": ([9], "'holdout'"),
        "label attack: ../../evil": ([10], "'../../evil'"),
        "unknown label": ([11], "'cat'"),
    }
    tasks = [
        _annotated(1, str(good)),
        _annotated(2, "/etc/passwd"),
        _annotated(3, "../../x.png"),
        _annotated(4, str(pool / ".." / "outside" / "secret.png")),
        _annotated(5, str(pool / "link.png")),
        _annotated(6, str(pool / "a\0b.png")),
        _annotated(7, str(good), eval_split=str(evil)),
        _annotated(8, str(good), eval_split="../x"),
        _annotated(9, str(good), eval_split="holdout"),
        _annotated(10, str(good), label="../../evil"),
        _annotated(11, str(good), label="cat"),
        _annotated(12, str(twin), label="not_fu"),
        _annotated(12, str(twin), label="not_fu"),  # the same task twice in one export
        _annotated(13, str(pool / "twin-copy.png"), label="not_fu"),  # another task, the same image
        _annotated(14, str(pool / "already.png")),  # an image the dataset holds already
    ]
    before = snapshot(dataset)
    outside_before = sorted(p for p in work.rglob("*") if dataset not in p.parents and p != dataset)
    try:
        report, added, _, error = ingest_batch(dataset, _export(tasks), roots, CLASSES)
    except Exception as exc:  # noqa: BLE001 - a traceback is the finding
        cases += [Case(kind, "ingest", "skipped, the reason naming it", f"traceback: {exc!r}"[:200], False)
                  for kind in attacks]
    else:
        lost = lost_since(before, snapshot(dataset))
        reasons = {s["task_id"]: s["reason"] for s in report.skipped}
        added_ids = sorted(r["task_id"] for r in added)
        for kind, (ids, word) in attacks.items():
            said = [reasons.get(i, "") for i in ids]
            ok = all(word in r for r in said) and not set(map(str, ids)) & set(added_ids)
            cases.append(Case(kind, "ingest", f"skipped, the reason naming {word!r}",
                              "; ".join(s or "not skipped" for s in said)[:200], ok))
        wrote_outside = sorted(p for p in work.rglob("*") if dataset not in p.parents and p != dataset
                               and not p.name.startswith(".")) != [p for p in outside_before
                                                                  if not p.name.startswith(".")]
        twins = [r for r in added if r["task_id"] in ("12", "13")]
        cases.append(Case("duplicate tasks", "ingest", "one image added once; the one already stored not again",
                          f"added tasks {added_ids}; error {error}",
                          error is None and len(twins) == 1 and "14" not in added_ids and "1" in added_ids
                          and not wrote_outside and lost == 0, lost=lost))

    # 2. An empty export (tasks without annotations are not exported): nothing added, nothing changed.
    before = snapshot(dataset)
    records = _export([{**_annotated(20, str(good)), "annotations": []}])
    report, added, _, error = ingest_batch(dataset, records, roots, CLASSES)
    lost = lost_since(before, snapshot(dataset))
    cases.append(Case("empty export", "ingest", "nothing added, nothing changed",
                      f"{len(records)} records; {report.summary()}; added {len(added)}; error {error}",
                      not records and not added and error is None and snapshot(dataset) == before, lost=lost))
    cancelled = _annotated(21, str(good))
    cancelled["annotations"][0].update(was_cancelled=True, result=[])
    rows, report = to_manifest_rows(_export([cancelled]), roots=roots, classes=CLASSES)
    reasons = [s["reason"] for s in report.skipped]
    cases.append(Case("task whose only annotation was skipped", "ingest", "skipped: no label",
                      "; ".join(reasons) or f"{len(rows)} rows", not rows and any("no label" in r for r in reasons)))

    # 3. The image corpus as one batch: rejected by the suite, the bad ones named, nothing stored.
    corpus = image_corpus()
    batch = pool / "corpus"
    batch.mkdir()
    paths = []
    for n, image in enumerate(corpus):
        path = batch / f"corpus-{n:02d}{image.suffix}"
        path.write_bytes(image.body)
        paths.append(path)
    before = snapshot(dataset)
    records = _export([_annotated(100 + n, str(p)) for n, p in enumerate(paths)])
    try:
        report, added, validation, error = ingest_batch(dataset, records, roots, CLASSES)
    except Exception as exc:  # noqa: BLE001
        cases.append(Case("image corpus batch", "ingest", "rejected by the suite", f"traceback: {exc!r}"[:200],
                          False))
        return cases
    lost = lost_since(before, snapshot(dataset))
    skipped = {s["task_id"]: s["reason"] for s in report.skipped}
    bounds = DatasetBounds()
    for n, (image, path) in enumerate(zip(corpus, paths, strict=True)):
        if 100 + n in skipped:
            verdict, ok = f"skipped: {skipped[100 + n]}", True
        else:
            facts = read_image_facts(path, "")  # what the suite's image checks read
            sized = facts["decodes"] and bounds.min_width <= facts["width"] <= bounds.max_width \
                and bounds.min_height <= facts["height"] <= bounds.max_height
            if facts["decodes"] is False:
                verdict = "named by the suite's 'images decode' check"
            elif not sized:
                verdict = f"decodes at {facts['width']}x{facts['height']}: named by the suite's size checks"
            else:
                verdict = f"decodes ({facts['width']}x{facts['height']})"
            ok = (facts["decodes"] is False or not sized) if image.broken else facts["decodes"] is True
        expected = "the suite names it (broken)" if image.broken else "read as an image, or skipped naming it"
        cases.append(Case(f"{image.kind}", "ingest", expected, verdict, ok))
    summary = validation.summary() if validation else ""
    cases.append(Case("image corpus batch", "ingest", "rejected by the suite, the dataset unchanged",
                      f"error: {str(error).splitlines()[0] if error else None}; added {len(added)}; lost {lost}",
                      error is not None and not added and "images decode" in summary and lost == 0, lost=lost))
    return cases


