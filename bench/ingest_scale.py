"""How the fast retrain's ingest grows with the dataset it adds to.

    saofu bench ingest-scale [--copies 1 --copies 2 --copies 4] [--draws 3]
    python -m bench.ingest_scale [--copies 1 2 4] [--draws 3] [--out bench/results/ingest_scale.json]

The campaign's labels (the `fu_merchant` images of the Fu world's train and val splits, 2,890 at
the fast-retrain bench's 17,000) are ingested into the world's `fu`/`not_fu` dataset, and into the
same dataset grown two and four times (copy k of an image is k bytes longer, so every file is new
content to DVC and to the validation suite). Each draw starts from a fresh copy and a fresh data
registry, prepared as a team's dataset is before a campaign (and as the fast-retrain bench
prepares its draws): validated once (the suite knows its images' facts), versioned once, flushed
to disk. That first version is the peer: what versioning the whole dataset costs. Then the
ingest's own work, as `flows.ingest.apply_validated` and `version_dataset` do it (without the
MLflow logging): the staged copy with the new rows, the Great Expectations suite, the swap, and
the data version, whose `dvc add` and `dvc push` are timed apart. Run alone (it writes and hashes
every file: other work on the machine moves the figures); 13 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WORLD_N = 17000  # the fast-retrain bench's world
NEW_CLASS = "fu_merchant"


def grow_dataset(base: Path, out: Path, copies: int) -> int:
    """`out`: `base` with every image `copies` times (copy k's bytes end with k more bytes), manifest and all.

    Copy 0 is the image itself; copy k > 0 is named `c{k}_<name>` beside it, with k extra bytes
    after the image's end (PNG decoders ignore them), so its content and hash are its own.

    Returns:
        The number of images in `out`.
    """
    from tasks.data.manifest import file_sha256, read_manifest, write_manifest

    rows = []
    for r in read_manifest(base):
        src = base / r["path"]
        data = src.read_bytes()
        for k in range(copies):
            rel = Path(r["path"]) if k == 0 else Path(r["path"]).with_name(f"c{k}_{Path(r['path']).name}")
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data + b"\0" * k)
            rows.append({**r, "path": rel.as_posix(), "sha256": file_sha256(dst) if k else r["sha256"]})
    write_manifest(out, rows)
    return len(rows)


@contextmanager
def dvc_laps(laps: dict[str, float]) -> Iterator[None]:
    """Time each DVC command the data registry runs (by its subcommand: `add`, `push`, ...) into `laps`."""
    import tasks.data.versions as versions

    run = versions._dvc

    def timed(cwd: Path, *args: str) -> str:
        started = time.perf_counter()
        try:
            return run(cwd, *args)
        finally:
            laps[f"dvc {args[0]}"] = laps.get(f"dvc {args[0]}", 0.0) + time.perf_counter() - started

    versions._dvc = timed
    try:
        yield
    finally:
        versions._dvc = run


def ingest_draw(base: Path, labels: list[dict], copies: int, work: Path) -> dict:
    """One draw: a fresh grown dataset and registry, prepared, then the labels ingested and versioned."""
    from tasks.data.dataset_lock import dataset_lock
    from tasks.data.manifest import add_images, relabel_images
    from tasks.data.validation import validate_dataset
    from tasks.data.versions import ensure_version
    from tasks.labeling.ingest import commit_staged, staged_copy

    if work.exists():
        shutil.rmtree(work)
    os.environ["SAOFU_HOME"] = str(work / "home")
    dataset = work / "data" / "fu"
    n_files = grow_dataset(base, dataset, copies)
    classes = ["fu", NEW_CLASS, "not_fu"]
    started = time.perf_counter()
    validate_dataset(dataset, classes=["fu", "not_fu"], docs_dir=work / "docs")
    first_validation = time.perf_counter() - started
    started = time.perf_counter()
    ensure_version(dataset, "fu", "before the campaign")
    first_version = time.perf_counter() - started
    # The preparation wrote every file two or three times; flushed now, its writeback does not land
    # in the ingest's time (a team's dataset was written long before its campaign).
    os.sync()

    steps: dict[str, float] = {}

    def lap(name: str, since: float) -> float:  # one clock read: no gap between a step and the next
        now = time.perf_counter()
        steps[name] = now - since
        return now

    t = time.perf_counter()
    with dataset_lock(dataset):
        staging = staged_copy(dataset)
        added = add_images(staging, labels)
        relabel_images(staging, labels)
        t = lap("stage and add", t)
        report = validate_dataset(staging, classes=classes, docs_dir=work / "docs")
        if not report.success:
            raise RuntimeError(f"the suite refused the campaign's labels:\n{report.summary()}")
        t = lap("validate", t)
        commit_staged(staging, dataset)
        t = lap("swap", t)
        laps: dict[str, float] = {}
        with dvc_laps(laps):
            ensure_version(dataset, "fu", f"{len(added)} {NEW_CLASS} labels")
        version = time.perf_counter() - t
    steps.update({name: laps.get(name, 0.0) for name in ("dvc add", "dvc push")})
    steps["version, the rest"] = version - steps["dvc add"] - steps["dvc push"]
    shutil.rmtree(work)
    return {"copies": copies, "dataset_files": n_files, "labels_added": len(added),
            "ingest_s": sum(steps.values()), "steps": steps,
            "first_validation_s": first_validation, "first_version_s": first_version}


def campaign_world(work: Path, world_n: int = WORLD_N) -> tuple[Path, list[dict]]:
    """The fast-retrain bench's world split as it splits it: the base dataset and the campaign's label rows."""
    from bench.fast_retrain import split_world
    from tasks.data.fu_world import WorldConfig, generate_world

    world = work / "world"
    if not (world / "manifest.csv").is_file():
        print(f"generating the Fu world with merchants: {world_n} images", flush=True)
        generate_world(world, WorldConfig(n=world_n, seed=0, image_size=64, merchant=True))
    base = work / "base"
    if base.exists():
        shutil.rmtree(base)
    label_paths, _, _ = split_world(world, base)
    labels = [{"image": str(p), "label": NEW_CLASS, "source": "human", "split": p.parent.parent.name}
              for p in label_paths]
    return base, labels


def summarize(draws: list[dict]) -> list[dict]:
    """Per dataset size: the median of each figure over its draws, and the range of the ingest's wall."""
    rows = []
    for copies in sorted({d["copies"] for d in draws}):
        mine = [d for d in draws if d["copies"] == copies]
        walls = [d["ingest_s"] for d in mine]
        rows.append({
            "copies": copies, "dataset_files": mine[0]["dataset_files"], "labels_added": mine[0]["labels_added"],
            "draws": len(mine), "ingest_s": statistics.median(walls), "ingest_range_s": [min(walls), max(walls)],
            "steps": {k: statistics.median(d["steps"][k] for d in mine) for k in mine[0]["steps"]},
            "first_version_s": statistics.median(d["first_version_s"] for d in mine),
            "first_validation_s": statistics.median(d["first_validation_s"] for d in mine),
        })
    return rows


def table(rows: list[dict]) -> str:
    """The medians side by side: the ingest's steps beside the first version of the whole dataset (the peer)."""
    steps = list(rows[0]["steps"])
    head = ["dataset files", "ingest, s (range)", *steps, "first version, s"]
    lines = [" | ".join(head)]
    for r in rows:
        lo, hi = r["ingest_range_s"]
        lines.append(" | ".join([f"{r['dataset_files']:,}", f"{r['ingest_s']:.1f} ({lo:.1f}-{hi:.1f})",
                                 *(f"{r['steps'][s]:.1f}" for s in steps), f"{r['first_version_s']:.1f}"]))
    return "\n".join(lines)


def run(copies: list[int], draws: int, work: Path, out: Path, world_n: int = WORLD_N) -> dict:
    from bench.models import _device_name

    base, labels = campaign_world(work, world_n)
    results = []
    for draw in range(draws):  # sizes interleaved, so a slow spell of the machine touches every size
        for k in copies:
            d = ingest_draw(base, labels, k, work / "draw")
            print(f"draw {draw + 1}/{draws}, {d['dataset_files']:,} files: ingest {d['ingest_s']:.1f} s ("
                  + ", ".join(f"{name} {s:.1f}" for name, s in d["steps"].items())
                  + f"); first version {d['first_version_s']:.1f} s", flush=True)
            results.append({"draw": draw, **d})
    rows = summarize(results)
    result = {"world_n": world_n, "labels": len(labels), "rows": rows, "draws": results, "device": _device_name(),
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return {**result, "table": table(rows)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--world-n", type=int, default=WORLD_N, help="images in the generated world")
    parser.add_argument("--work", type=Path, default=Path("bench/work/ingest_scale"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/ingest_scale.json"))
    args = parser.parse_args()
    print(run(args.copies, args.draws, args.work.resolve(), args.out, args.world_n)["table"])
