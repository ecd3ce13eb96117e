"""Data tests of the Great Expectations suite (tasks/data/validation.py).

A small generated world passes every check; each way of breaking it fails its own check and only
that one, and the summary names the offending file or label.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from saofu.errors import SaofuError
from tasks.data.fu_world import WorldConfig, generate_world
from tasks.data.manifest import file_sha256, read_manifest, write_manifest
from tasks.data.validation import DatasetBounds, raise_if_failed, validate_dataset

CLASSES = ["fu", "not_fu"]


@pytest.fixture(scope="module")
def base_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, WorldConfig(n=60, seed=11, image_size=32), workers=1)
    return out


@pytest.fixture
def world(base_world: Path, tmp_path: Path) -> Path:
    """A private copy of the world, free to break."""
    return Path(shutil.copytree(base_world, tmp_path / "w"))


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def first_row(world: Path, split: str = "train", label: str = "fu") -> dict[str, str]:
    return next(r for r in read_manifest(world) if r["split"] == split and r["label"] == label)


def add_row(world: Path, rel: str, data: bytes, label: str, split: str, source: str = "generated") -> None:
    """Write a file into the tree and a manifest row that describes it correctly."""
    (world / rel).parent.mkdir(parents=True, exist_ok=True)
    (world / rel).write_bytes(data)
    row = {"path": rel, "label": label, "split": split, "source": source, "sha256": file_sha256(world / rel)}
    write_manifest(world, [*read_manifest(world), row])


def replace_file(world: Path, rel: str, data: bytes, update_manifest: bool = True) -> None:
    (world / rel).write_bytes(data)
    if update_manifest:
        rows = read_manifest(world)
        for r in rows:
            if r["path"] == rel:
                r["sha256"] = file_sha256(world / rel)
        write_manifest(world, rows)


# --- each break: (what it does, the check it must fail, text the summary must hold) ----------------


def unknown_label(w: Path) -> str:
    add_row(w, "train/cat/x.png", png(32, 32, (1, 2, 3)), "cat", "train")
    return "'cat' (train/cat/x.png)"


def undecodable(w: Path) -> str:
    rel = first_row(w)["path"]
    replace_file(w, rel, b"\x89PNG\r\n\x1a\n this is not really a png")
    return rel


def too_wide(w: Path) -> str:
    rel = first_row(w)["path"]
    replace_file(w, rel, png(2000, 32))
    return f"2000 px ({rel})"


def too_short(w: Path) -> str:
    rel = first_row(w, label="not_fu")["path"]
    replace_file(w, rel, png(32, 8))
    return f"8 px ({rel})"


def duplicated(w: Path) -> str:
    rel = first_row(w)["path"]
    add_row(w, "train/fu/copy.png", (w / rel).read_bytes(), "fu", "train")
    return f"{rel} = train/fu/copy.png"


def train_test_leak(w: Path) -> str:
    rel = first_row(w)["path"]
    add_row(w, "test/fu/leak.png", (w / rel).read_bytes(), "fu", "test")
    return "test/fu/leak.png"


def missing_file(w: Path) -> str:
    rel = first_row(w, split="val")["path"]
    (w / rel).unlink()
    return rel


def sha_mismatch(w: Path) -> str:
    rel = first_row(w, split="test", label="not_fu")["path"]
    replace_file(w, rel, png(32, 32, (9, 9, 9)), update_manifest=False)
    return rel


def unknown_split(w: Path) -> str:
    add_row(w, "holdout/fu/x.png", png(32, 32, (4, 5, 6)), "fu", "holdout")
    return "'holdout' (holdout/fu/x.png)"


def unknown_source(w: Path) -> str:
    add_row(w, "train/fu/robot.png", png(32, 32, (7, 8, 9)), "fu", "train", source="robot")
    return "'robot' (train/fu/robot.png)"


BREAKS: list[tuple[Callable[[Path], str], str]] = [
    (unknown_label, "labels"),
    (undecodable, "decodes"),
    (too_wide, "width"),
    (too_short, "height"),
    (duplicated, "unique_content"),
    (train_test_leak, "split_leak"),
    (missing_file, "files_exist"),
    (sha_mismatch, "sha256_matches"),
    (unknown_split, "splits"),
    (unknown_source, "sources"),
]


def test_generated_world_passes_every_check(base_world: Path) -> None:
    report = validate_dataset(base_world)
    assert report.success, report.summary()
    assert report.classes == CLASSES
    assert report.n_images == 60
    assert len(report.checks) == 12
    assert report.summary().count("PASSED") == 1
    raise_if_failed(report)  # does not raise


@pytest.mark.parametrize(("break_it", "key"), BREAKS, ids=[b[1] for b in BREAKS])
def test_each_break_fails_only_its_own_check(world: Path, break_it: Callable[[Path], str], key: str) -> None:
    named = break_it(world)
    report = validate_dataset(world, classes=CLASSES)
    assert [c.key for c in report.failed] == [key], report.summary()
    check = report.check(key)
    assert check.details["unexpected_count"] >= 1
    assert check.details["rows"], check.details
    line = next(x for x in report.summary().splitlines() if x.startswith(f"FAILED: {check.name}"))
    assert named in line, line


def test_class_with_no_train_images_fails_class_min(world: Path) -> None:
    report = validate_dataset(world, classes=[*CLASSES, "fu_merchant"])
    assert [c.key for c in report.failed] == ["class_min"], report.summary()
    assert "train/fu_merchant has 0 (min 1)" in report.summary()
    assert report.check("class_min").details["rows"] == [{"path": "train/fu_merchant", "count": 0, "min_count": 1}]


def test_dominant_class_fails_class_share(base_world: Path) -> None:
    rows = read_manifest(base_world)
    val_fu = sum(r["split"] == "val" and r["label"] == "fu" for r in rows)
    val = sum(r["split"] == "val" for r in rows)
    assert (val_fu, val) == (5, 9)  # 56% > 55%; train holds 21 + 21, exactly 50%
    report = validate_dataset(base_world, bounds=DatasetBounds(max_class_share=0.55))
    assert [c.key for c in report.failed] == ["class_share"], report.summary()
    assert "56%" in report.check("class_share").details["message"]


def test_default_class_set_is_the_train_labels(world: Path) -> None:
    add_row(world, "val/cat/x.png", png(32, 32, (3, 2, 1)), "cat", "val")
    report = validate_dataset(world)  # no classes given: cat never appears in train
    assert report.classes == CLASSES
    assert [c.key for c in report.failed] == ["labels"]
    assert "'cat' (val/cat/x.png)" in report.summary()


def test_summary_and_raise_if_failed(world: Path) -> None:
    unknown_label(world)
    missing = missing_file(world)
    report = validate_dataset(world, classes=CLASSES)
    summary = report.summary()
    assert "2 of 12 checks FAILED" in summary
    assert f"FAILED: labels in class set — 1 row with labels not in {CLASSES}: 'cat' (train/cat/x.png)" in summary
    assert f"FAILED: manifest files exist — 1 manifest row whose file is missing: {missing}" in summary
    with pytest.raises(SaofuError, match="labels in class set"):
        raise_if_failed(report)


def test_data_docs_written(world: Path, tmp_path: Path) -> None:
    unknown_label(world)
    docs = tmp_path / "docs"
    report = validate_dataset(world, classes=CLASSES, docs_dir=docs)
    assert report.docs_path == docs / "index.html"
    assert report.docs_path.is_file()
    pages = list((docs / "validations").rglob("*.html"))
    assert len(pages) == 2  # one page per suite: images and class counts
    assert any("train/cat/x.png" in p.read_text() for p in pages)
    assert f"data docs: {report.docs_path}" in report.summary()


def test_bad_input_raises_saofu_error(tmp_path: Path) -> None:
    with pytest.raises(SaofuError, match="not found"):
        validate_dataset(tmp_path / "nope")
    with pytest.raises(SaofuError, match="manifest"):
        validate_dataset(tmp_path)
    write_manifest(tmp_path, [])
    with pytest.raises(SaofuError, match="no class set"):
        validate_dataset(tmp_path)
    with pytest.raises(SaofuError, match="max_class_share"):
        DatasetBounds(max_class_share=1.5)
    with pytest.raises(SaofuError, match="width"):
        DatasetBounds(min_width=64, max_width=32)


@pytest.mark.timeout(120)
def test_a_second_validation_reads_only_new_or_changed_files(world: Path, saofu_home: Path, monkeypatch) -> None:
    import tasks.data.image_facts as image_facts

    real, read = image_facts.read_image_facts, []

    def counting(path, sha):
        read.append(path.name)
        return real(path, sha)

    monkeypatch.setattr(image_facts, "read_image_facts", counting)
    n = len(read_manifest(world))
    assert validate_dataset(world).success and len(read) == n

    read.clear()
    add_row(world, "train/fu/new.png", png(32, 32), "fu", "train")
    changed = first_row(world, "train", "not_fu")["path"]
    (world / changed).write_bytes(png(32, 32, (1, 2, 3)))  # other bytes, the manifest's hash now stale
    report = validate_dataset(world)

    assert sorted(read) == sorted(["new.png", Path(changed).name]), "unchanged files were read again"
    assert not report.success, "a file changed behind the manifest's hash passed (stale cached facts)"
