"""Taking auto-labels back (tasks/labeling/revert.py, flows/labels_revert.py, `saofu labels`).

A small dataset made with `add_images`: human rows, generated rows, and auto rows voted by
several model versions, among them `fu:1` and `fu:10` (a prefix match would take both). Every
test has its own SAOFU_HOME, so the data registry, DVC cache and remote live in its temporary folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import tasks.data.versions as dv
import tasks.labeling.revert as revert_mod
from saofu.errors import SaofuError
from tasks.data.manifest import add_images, read_manifest
from tasks.data.versions import checkout_version, create_version, get_version, list_versions, version_of
from tasks.labeling.revert import auto_labels_by_model, dataset_name_for, restore_version, revert_auto_labels

SAOFU = str(Path(sys.executable).with_name("saofu"))

# (source, label, model_versions): the rows of the test dataset, in order
ROWS = [
    ("human", "fu", ""),
    ("human", "not_fu", ""),
    ("human", "fu", "fu:1;other:2"),  # a human correction that kept the voters' column: never touched
    ("generated", "fu", ""),
    ("generated", "not_fu", ""),
    ("auto", "fu", "fu:1;other:2"),
    ("auto", "fu", "fu:1;other:2"),
    ("auto", "not_fu", "other:2;fu:1"),  # fu:1 as the second voter
    ("auto", "fu", "fu:10;other:2"),  # the trap: fu:10 is not fu:1
    ("auto", "not_fu", "fu:10;other:2"),
    ("auto", "fu", "fu:3;other:5"),
]
REVERTED = {5, 6, 7}  # the rows fu:1 voted for


@pytest.fixture
def home(saofu_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(dv.REMOTE_ENV, raising=False)
    return saofu_home


def make_dataset(root: Path, images: Path) -> Path:
    """The dataset of ROWS, one distinct image each (so one file per row)."""
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (source, label, voters) in enumerate(ROWS):
        img = images / f"{i}.png"
        Image.new("RGB", (8, 8), (20 * i, 255 - 20 * i, 7 * i)).save(img)
        row = {"image": str(img), "label": label, "source": source, "split": "train"}
        if voters:
            row |= {"model_versions": voters, "scores": "0.990000;0.980000"}
        rows.append(row)
    assert len(add_images(root, rows)) == len(ROWS)
    return root


@pytest.fixture
def dataset(home: Path, tmp_path: Path) -> Path:
    return make_dataset(home / "data" / "labelled", tmp_path / "images")


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def manifest_lines(root: Path) -> list[str]:
    return (root / "manifest.csv").read_text().splitlines()


# ------------------------------------------------------------------------------------ matching


@pytest.mark.timeout(120)
def test_only_auto_rows_holding_the_whole_token_match(dataset):
    rows = read_manifest(dataset)
    assert [rows.index(r) for r in auto_labels_by_model(rows, "fu:1")] == sorted(REVERTED)
    assert [rows.index(r) for r in auto_labels_by_model(rows, " fu:10 ")] == [8, 9]
    assert [rows.index(r) for r in auto_labels_by_model(rows, "other:2")] == [5, 6, 7, 8, 9]
    assert auto_labels_by_model(rows, "fu:2") == [] and auto_labels_by_model(rows, "other:5") == [rows[10]]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad", ["", "fu", "fu:", ":1", "fu:v1", "fu:1;other:2", "fu 1:2", "fu:1:2"])
def test_a_malformed_model_version_is_named_and_nothing_changes(dataset, home, bad):
    before = hashes(dataset)
    with pytest.raises(SaofuError, match="is not NAME:VERSION") as err:
        revert_auto_labels(dataset, bad, "fu")
    assert repr(bad) in str(err.value)
    assert hashes(dataset) == before and list_versions() == []


# ----------------------------------------------------------------------------------- reverting


@pytest.mark.timeout(120)
def test_revert_removes_exactly_one_versions_auto_labels_and_is_undone_by_the_version_before(dataset, tmp_path):
    files_before, lines_before = hashes(dataset), manifest_lines(dataset)
    rows_before = read_manifest(dataset)
    gone_paths = {rows_before[i]["path"] for i in REVERTED}

    result = revert_auto_labels(dataset, "fu:1", "fu", message="audit 2026-12-04")

    assert (result.removed, result.kept, result.per_class) == (3, len(ROWS) - 3, {"fu": 2, "not_fu": 1})
    assert set(result.removed_paths) == gone_paths
    assert result.removed_sha256 == [rows_before[i]["sha256"] for i in sorted(REVERTED)]
    # every other file byte-identical, the removed ones gone; the manifest lost exactly their lines
    files_after = hashes(dataset)
    assert files_after.pop("manifest.csv") != files_before["manifest.csv"]
    assert files_after == {k: v for k, v in files_before.items() if k not in gone_paths | {"manifest.csv"}}
    gone_lines = {lines_before[1 + i] for i in REVERTED}  # line 0 is the header
    assert manifest_lines(dataset) == [line for line in lines_before if line not in gone_lines]
    assert [r for r in read_manifest(dataset)] == [r for i, r in enumerate(rows_before) if i not in REVERTED]

    # recorded: the version before holds the dataset as it was, the one after as it is now
    assert [v.id for v in list_versions()] == ["fu@v1", "fu@v2"]
    assert (result.version_before, result.version_after) == ("fu@v1", "fu@v2")
    assert version_of(dataset) == "fu@v2"
    message = get_version("fu@v2").message
    assert all(s in message for s in ("fu:1", "3 auto-labels", "before: fu@v1", "audit 2026-12-04"))

    # reversible: the version before gives back every removed row and file, byte for byte
    out = checkout_version("fu@v1", tmp_path / "v1")
    assert hashes(out) == files_before
    assert restore_version(dataset, "fu@v1").id == "fu@v1"
    assert hashes(dataset) == files_before and manifest_lines(dataset) == lines_before

    # the same revert again converges on the same two versions instead of making new ones
    again = revert_auto_labels(dataset, "fu:1", "fu")
    assert (again.version_before, again.version_after, again.removed) == ("fu@v1", "fu@v2", 3)
    assert len(list_versions()) == 2


@pytest.mark.timeout(120)
def test_a_version_with_no_auto_label_makes_no_version_and_changes_nothing(dataset):
    before = hashes(dataset)
    result = revert_auto_labels(dataset, "fu:2", "fu")
    assert (result.removed, result.version_before, result.version_after, result.kept) == (0, None, None, len(ROWS))
    assert hashes(dataset) == before and list_versions() == []


@pytest.mark.timeout(120)
def test_an_emptied_class_folder_goes_and_a_shared_file_stays(dataset):
    # fu:3 voted for the only auto row of its kind; make a human row point at the same file
    rows = read_manifest(dataset)
    shared = rows[10]["path"]
    with (dataset / "manifest.csv").open("a", newline="") as fh:
        csv.writer(fh).writerow([shared, "fu", "train", "human", rows[10]["sha256"]] + [""] * (len(rows[0]) - 5))
    result = revert_auto_labels(dataset, "fu:3", "fu")
    assert result.removed == 1 and result.removed_paths == [] and (dataset / shared).is_file()

    # all of a class's images auto-labelled by one version: its emptied folder does not stay behind
    img = dataset.parent / "lone.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(img)
    add_images(dataset, [{"image": str(img), "label": "fu_merchant", "source": "auto", "split": "val",
                          "model_versions": "fu:7;other:2"}])
    assert (dataset / "val" / "fu_merchant").is_dir()
    revert_auto_labels(dataset, "fu:7", "fu")
    assert not (dataset / "val").exists() and (dataset / "train" / "fu").is_dir()


@pytest.mark.timeout(120)
def test_a_failed_swap_leaves_the_dataset_whole(dataset, monkeypatch):
    before = hashes(dataset)

    def crash(staging, target):
        raise OSError("disk gone")

    monkeypatch.setattr(revert_mod, "commit_staged", crash)
    with pytest.raises(OSError, match="disk gone"):
        revert_auto_labels(dataset, "fu:1", "fu")
    assert hashes(dataset) == before
    assert not any(p.name.startswith(".labelled.") and p.is_dir() for p in dataset.parent.iterdir())


@pytest.mark.timeout(120)
def test_the_name_is_derived_from_the_versions_the_dataset_came_from(dataset, home):
    assert dataset_name_for(dataset) == "labelled"  # no versions yet: the folder's name
    create_version(dataset, "fu", "ingest")
    assert dataset_name_for(dataset) == "fu"  # exactly a version's content
    img = home / "new.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(img)
    add_images(dataset, [{"image": str(img), "label": "fu", "source": "auto", "model_versions": "fu:1;other:2"}])
    assert version_of(dataset) is None and dataset_name_for(dataset) == "fu"  # shares the most images
    result = revert_auto_labels(dataset, "fu:1", "")
    assert (result.dataset_name, result.version_before, result.version_after) == ("fu", "fu@v2", "fu@v3")


@pytest.mark.timeout(120)
def test_restore_refuses_to_drop_changes_no_version_holds(dataset):
    revert_auto_labels(dataset, "fu:1", "fu")
    img = dataset.parent / "later.png"
    Image.new("RGB", (8, 8), (4, 5, 6)).save(img)
    add_images(dataset, [{"image": str(img), "label": "fu", "source": "human"}])
    changed = hashes(dataset)
    with pytest.raises(SaofuError, match="in no data version"):
        restore_version(dataset, "fu@v1")
    assert hashes(dataset) == changed
    with pytest.raises(SaofuError, match="unknown data version"):
        restore_version(dataset, "fu@v9", force=True)
    restore_version(dataset, "fu@v1", force=True)
    assert len(read_manifest(dataset)) == len(ROWS)


# ----------------------------------------------------------------------------------- flow and CLI


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.timeout(240)
def test_the_flow_reverts_the_project_dataset_and_logs_to_mlflow(prefect_api, dataset, home):
    from flows.labels_revert import LabelsRevertParams, labels_revert_flow
    from tasks import tracking

    before = hashes(dataset)
    met = labels_revert_flow(LabelsRevertParams(model_version="fu:1", audited_precision=0.99, precision_target=0.98))
    assert met.skipped.startswith("the audited precision 0.99") and hashes(dataset) == before

    # no dataset named: <SAOFU_HOME>/data/labelled, as the scheduled flows resolve it
    result = labels_revert_flow(LabelsRevertParams(model_version="fu:1", audited_precision=0.9,
                                                   precision_target=0.98))
    assert (result.removed, result.dataset_dir, result.dataset_name) == (3, str(dataset), "labelled")
    assert (result.version_before, result.version_after) == ("labelled@v1", "labelled@v2")
    assert "below the target 0.98" in get_version("labelled@v2").message
    run = tracking.client().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["removed"] == 3 and run.data.metrics["removed/fu"] == 2
    assert run.data.tags["data_version"] == "labelled@v2" and run.data.tags["model_version"] == "fu:1"
    assert run.data.tags["data_version_before"] == "labelled@v1"


def run_saofu(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAOFU_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop(dv.REMOTE_ENV, None)
    return subprocess.run([SAOFU, *args], capture_output=True, text=True, timeout=200, env=env, cwd=home)


@pytest.mark.timeout(240)
def test_the_cli_reverts_says_how_to_undo_and_undoes(dataset, home):
    before = hashes(dataset)
    bad = run_saofu(["labels", "revert", "--by-model", "fu", "--dataset", str(dataset)], home)
    assert bad.returncode == 2 and "'fu' is not NAME:VERSION" in bad.stderr and "Traceback" not in bad.stderr

    out = run_saofu(["labels", "revert", "--by-model", "fu:1", "--dataset", str(dataset), "--name", "fu",
                     "--json"], home)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["removed"], summary["per_class"]) == (3, {"fu": 2, "not_fu": 1})
    assert (summary["version_before"], summary["version_after"]) == ("fu@v1", "fu@v2")
    assert summary["undo"] == f"saofu labels restore fu@v1 --dataset {dataset}"

    undo = run_saofu(summary["undo"].split()[1:], home)
    assert undo.returncode == 0, undo.stderr
    assert hashes(dataset) == before
    text = run_saofu(["labels", "revert", "--by-model", "fu:10", "--dataset", str(dataset), "--name", "fu"], home)
    assert text.returncode == 0, text.stderr
    assert "removed 2 auto-labels of fu:10 (fu 1, not_fu 1)" in text.stdout
    assert "data version fu@v1 -> fu@v3" in text.stdout and "undo: saofu labels restore fu@v1" in text.stdout


@pytest.mark.timeout(240)
def test_the_flow_survives_the_executors_pickle_round_trip():
    """The executor runs flows pickled by value in a spawned process (tests/flows/test_served_flows_pickle.py)."""
    import multiprocessing

    import cloudpickle

    import flows.labels_revert as module

    payload = cloudpickle.dumps(module.labels_revert_flow)  # its function by value: the module attribute is the Flow
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        outcome = pool.apply(_validate, (payload, {"params": {"model_version": "fu:3"}}))
    assert outcome == "LabelsRevertParams fu:3"


def _validate(payload: bytes, parameters: dict) -> str:
    import cloudpickle

    flow = cloudpickle.loads(payload)
    params = flow.validate_parameters(parameters)["params"]
    return f"{type(params).__name__} {params.model_version}"
