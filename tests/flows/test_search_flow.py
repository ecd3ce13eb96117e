"""A short study on generated data through the search flow: pruning, nested runs, a rebuildable best trial."""

from __future__ import annotations

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.search import SearchFlowParams, search_flow
from models import count_flops, create_model
from tasks.search.space import SearchSpace, StageSpace, plan_from_params

# A small space over small models, so a trial on the 32 px shapes dataset takes about a second.
TINY_SPACE = SearchSpace(
    stem_widths=[8], head_widths=[32, 64], head_acts=["r6"], resolutions=[32, 24],
    stages=[
        StageSpace(type="ds", stride=1, widths=[8], kernels=[3], depths=[1], se=[0.0], acts=["r6"]),
        StageSpace(widths=[16, 8, 24], kernels=[3, 5], expansions=[2, 4], depths=[1], se=[0.0, 0.25],
                   acts=["r6", "hs"]),
    ],
    grid_dims=["s1_width", "resolution"],
)


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_a_short_study_prunes_nests_its_trials_and_registers_a_rebuildable_best(prefect_api, saofu_home, shapes_dir):
    torch.set_num_threads(1)
    params = SearchFlowParams(
        data_dir=str(shapes_dir), space=TINY_SPACE, n_trials=12, epochs=4, final_epochs=3, sampler="tpe",
        pruner="hyperband", targets={"mflops": 0.5, "kparams": 5.0}, registered_model="searched",
        experiment="test-search",
    )
    result = search_flow(params)

    assert result.trials == 12 and result.failed == 0
    assert result.pruned >= 1, "Hyperband pruned nothing in 12 trials"
    assert result.finished + result.pruned == 12

    client = MlflowClient(tracking_uri=result.retrain.tracking_uri, registry_uri=result.retrain.tracking_uri)
    study_run = client.get_run(result.run_id)
    assert study_run.info.status == "FINISHED"
    assert "pareto.png" in {a.path for a in client.list_artifacts(result.run_id)}
    children = client.search_runs([study_run.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{result.run_id}'", max_results=100)
    trial_runs = [r for r in children if "optuna_trial" in r.data.tags]
    assert len(trial_runs) == 12  # one nested run per trial ...
    assert {r.data.tags["pruned"] for r in trial_runs} == {"true", "false"}
    assert all(r.info.status == "FINISHED" and "arch" in r.data.params for r in trial_runs)
    retrain_runs = [r for r in children if r.data.tags.get("search_trial") == str(result.best_trial)]
    assert len(retrain_runs) == 1  # ... and the best trial's retrain nests there too

    # The best trial rebuilds from what the study stored, to the model that was retrained.
    study = optuna.load_study(study_name=result.study_name, storage=f"sqlite:///{saofu_home}/.saofu/search/optuna.db")
    best = study.trials[result.best_trial]
    plan = plan_from_params(best.params, TINY_SPACE)
    assert plan.arch == best.user_attrs["arch"] == result.best_arch
    model = create_model("saofu_from_arch", num_classes=3, arch=plan.arch)
    assert count_flops(model, plan.image_size) / 1e6 == pytest.approx(best.user_attrs["mflops"])
    version = client.get_model_version("searched", result.retrain.version)
    assert version.tags["arch"] == plan.arch
