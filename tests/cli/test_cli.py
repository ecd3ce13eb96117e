"""The `saofu` command line: --json summaries, and one clear line (no traceback) for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_shapes_dataset

SAOFU = str(Path(sys.executable).with_name("saofu"))


def run(args: list[str], home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAOFU_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([SAOFU, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=home)


def test_models_list_json_names_every_factory(tmp_path):
    from models import list_models

    out = run(["models", "list", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)["models"]}
    assert set(rows) == set(list_models()) - {"saofu_from_arch"}
    assert rows["saofu_fu"]["params"] * 10 < rows["mobilenet_v3_small_050"]["params"]
    assert all(r["mflops"] > 0 for r in rows.values())


def test_data_generate_json(tmp_path):
    out = run(["data", "generate", "--out", str(tmp_path / "w"), "--n", "60", "--seed", "3",
               "--size", "32", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)  # stdout holds the summary only; progress went to stderr
    assert sum(sum(c.values()) for c in summary["counts"].values()) == 60
    assert (tmp_path / "w" / "manifest.csv").exists()
    assert not set(summary["train_font_groups"]) & set(summary["test_font_groups"])


@pytest.fixture
def broken(tmp_path):
    def make(kind: str) -> Path:
        root = make_shapes_dataset(tmp_path / kind, n_per_class=3)
        if kind == "empty_class":
            (root / "zebra").mkdir()
        elif kind == "unreadable":  # more than the handful loading leaves out
            for i in range(6):
                (root / "square" / f"bad{i}.jpg").write_bytes(b"\x00\x01garbage")
        return root

    return make


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "error: dataset folder not found"),
        ("empty_class", "error: class folder has no images"),
        ("unreadable", "error: 6 of 15 images"),
        ("unknown_model", "error: unknown model 'resnet9000'"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, broken, case, expected):
    data = tmp_path / "missing" if case == "missing" else broken(case)
    args = ["train", "--data", str(data), "--epochs", "1"]
    if case == "unknown_model":
        args += ["--model", "resnet9000"]
    out = run(args, tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(expected)
    assert "Traceback" not in out.stderr and out.stdout == ""


@pytest.mark.slow
def test_train_any_imagefolder_reports_json(tmp_path):
    data = make_shapes_dataset(tmp_path / "shapes", n_per_class=60)
    out = run(["train", "--data", str(data), "--model", "saofu_fu_tiny", "--epochs", "12", "--batch-size", "32",
               "--lr", "0.01", "--image-size", "32", "--registered-model", "shapes", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["version"] == "1" and summary["registered_model"] == "shapes"
    assert summary["run_id"] and summary["params"] > 0 and summary["mflops"] > 0
    assert summary["val_accuracy"] > 0.5  # three classes: chance is 1/3
    assert summary["eval_split"] == "val"  # a flat folder has no held-out test split
    assert (tmp_path / "mlflow" / "mlflow.db").exists()


@pytest.mark.slow
def test_dvc_repro_reproduces_a_training_offline(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    work = tmp_path / "pipe"
    work.mkdir()
    shutil.copy(repo / "dvc.yaml", work)
    params = (repo / "params.yaml").read_text()
    params = (params.replace("n: 4000", "n: 90").replace("image_size: 96", "image_size: 32")
              .replace("epochs: 20", "epochs: 2").replace("model: saofu_fu", "model: saofu_fu_tiny"))
    (work / "params.yaml").write_text(params)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SAOFU_HOME": str(work)}
    dvc = str(Path(sys.executable).with_name("dvc"))

    def sh(*args):
        return subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)

    assert sh("git", "init", "-q").returncode == 0
    assert sh(dvc, "init", "-q").returncode == 0
    first = sh(dvc, "repro")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    report = json.loads((work / "pipeline" / "eval.json").read_text())
    assert report["split"] == "test" and report["n"] > 0
    metrics = sh(dvc, "metrics", "show", "--json")
    assert "accuracy_at_threshold" in metrics.stdout
    again = sh(dvc, "repro")
    assert again.returncode == 0
    assert "didn't change" in again.stdout or "up to date" in again.stdout.lower()
    assert "Running stage 'train'" not in again.stdout


@pytest.mark.parametrize("args, message", [
    (["--sampler", "anneal"], "sampler: Input should be 'tpe'"),
    (["--sampler", "nsga2", "--pruner", "hyperband"], "cannot prune"),
    (["--trials", "0"], "n_trials: Input should be greater than or equal to 1"),
    (["--data", "/no/such/folder"], "dataset folder not found: /no/such/folder"),
])
def test_search_rejects_bad_parameters_in_one_line(tmp_path, args, message):
    out = run(["search", *args], tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / ".saofu" / "search").exists()  # nothing was started or stored


def test_rollback_of_an_unknown_model_is_one_clear_line(tmp_path):
    out = run(["rollback", "no-such-model"], tmp_path)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no-such-model" in last and "Traceback" not in out.stderr


def test_serve_of_an_unregistered_model_fails_before_opening_the_port(tmp_path):
    from mlflow.tracking import MlflowClient

    no_store = run(["serve", "--port", "0", "--model", "no-such-model"], tmp_path, timeout=120)
    assert no_store.returncode == 2, no_store.stderr
    last = no_store.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no MLflow store at ") and "Traceback" not in no_store.stderr
    assert "Uvicorn running" not in no_store.stderr

    (tmp_path / "mlflow").mkdir()
    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}").search_registered_models()
    out = run(["serve", "--port", "0", "--model", "no-such-model"], tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no-such-model" in last and "Traceback" not in out.stderr
    assert "Uvicorn running" not in out.stderr


def test_bench_search_seeds_sums_up_the_committed_draws_and_names_a_wrong_file(tmp_path):
    repo = Path(__file__).resolve().parents[2] / "bench" / "results"
    draws = [str(repo / f"search_pruning_s{s}.json") for s in (0, 1, 2)]
    out = run(["bench", "search-seeds", *draws, "--out", str(tmp_path / "p.json"), "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["seeds"] == [0, 1, 2]
    shares = [d["studies"]["tpe + hyperband"]["share"] for d in summary["draws"]]
    assert summary["studies"]["tpe + hyperband"]["median_share"] == sorted(shares)[1]
    assert (tmp_path / "p_curves.png").exists()

    bad = run(["bench", "search-seeds", str(repo / "labeling.json"), "--out", str(tmp_path / "q.json")], tmp_path)
    assert bad.returncode != 0
    assert "labeling.json is not a `saofu bench search` result" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "q.json").exists()


def test_demo_ends_by_naming_the_next_commands(saofu_home, monkeypatch, capsys):
    """The demo registers a version but no champion: it tells a new user how to get one served."""
    from types import SimpleNamespace

    import saofu.cli.train as train_cli

    summary = {"run_id": "r1", "registered_model": "fu-recognizer", "version": "1", "val_accuracy": 0.9,
               "test_accuracy_at_threshold": 0.8, "eval_split": "test", "params": 9000, "mflops": 1.5,
               "latency_p50_ms": 0.2, "onnx_path": "model.onnx", "tracking_uri": "sqlite:///mlflow.db"}
    result = SimpleNamespace(**summary, model_dump=lambda: summary)
    monkeypatch.setattr(train_cli, "run_flow", lambda flow, params: result)

    train_cli.demo(train_only=True, n=60, epochs=1, as_json=False)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("next: saofu release ") and "the first release becomes the champion" in lines[-2]
    assert lines[-1] == "then: saofu serve --port 8000"

    train_cli.demo(train_only=True, n=60, epochs=1, as_json=True)
    assert json.loads(capsys.readouterr().out) == summary  # --json: the summary alone


@pytest.mark.timeout(60)
def test_fast_retrain_command_runs_the_form_s_defaults_unless_told(monkeypatch):
    """What the command leaves unset is what the Prefect UI's form starts from; `--parent-gate 0` turns the gate off."""
    from typer.testing import CliRunner

    import saofu.cli.retrain as retrain_cli
    from flows.fast_retrain import FastRetrainParams
    from saofu.cli import app

    class Stop(Exception):
        pass

    sent = []

    def fake_run_flow(flow, params):
        sent.append(params)
        raise Stop

    monkeypatch.setattr(retrain_cli, "run_flow", fake_run_flow)
    runner = CliRunner()
    runner.invoke(app, ["fast-retrain", "--add", "fu_merchant", "--refines", "fu", "--labels", "fu-recognizer"])
    runner.invoke(app, ["fast-retrain", "--add", "fu_merchant", "--labels", "fu-recognizer", "--parent-gate", "0"])
    form = FastRetrainParams()
    fields = ("budget_min", "replay_share", "new_class_recall", "max_old_class_drop_pts", "parent_gate",
              "canary_share", "registered_model", "base_version")
    assert {f: getattr(sent[0], f) for f in fields} == {f: getattr(form, f) for f in fields}
    assert form.parent_gate == 0.99 and sent[1].parent_gate == 0.0
