"""The search's parts on their own: space, score, Pareto front, compound scaling, the worker loop."""

from __future__ import annotations

import math

import optuna
import pytest

from models import SAOFU_FU_ARCH, count_flops, count_params, create_model
from models.scaling import compound_scale, scale_once
from saofu.errors import SaofuError
from tasks.search.objective import ScoreTargets, combined_score, trial_costs
from tasks.search.report import best_row, best_so_far, pareto_front, rebuild_plan
from tasks.search.space import SearchSpace, StageSpace, plan_from_params, suggest_params
from tasks.search.study import SAMPLERS, counting_trials, make_pruner, make_sampler, make_storage, run_worker

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------------------------------ space


def test_the_default_space_defaults_to_saofu_fu():
    plan = plan_from_params({}, SearchSpace())
    assert plan.arch == SAOFU_FU_ARCH
    assert plan.image_size == 64


def test_every_sampled_plan_builds_and_rebuilds_from_its_params():
    space = SearchSpace()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    archs = set()
    for _ in range(12):
        trial = study.ask()
        plan = plan_from_params(suggest_params(trial, space), space)
        model = create_model("saofu_from_arch", num_classes=2, arch=plan.arch)
        assert count_params(model) > 0
        # What Optuna stored is enough to rebuild the same plan.
        assert plan_from_params(trial.params, space) == plan
        archs.add(plan.arch)
        study.tell(trial, 0.0)
    assert len(archs) > 6  # the space is really explored, not one string


def test_a_value_outside_the_space_is_rejected_by_name():
    space = SearchSpace()
    with pytest.raises(SaofuError, match="s1_kernel=9"):
        plan_from_params({"s1_kernel": 9}, space)
    with pytest.raises(SaofuError, match="lr=0.5 is outside"):
        plan_from_params({"lr": 0.5}, space)
    with pytest.raises(SaofuError, match="unknown search parameters"):
        plan_from_params({"width": 3}, space)
    with pytest.raises(ValueError, match="kernel 4"):
        StageSpace(widths=[8], kernels=[4])
    with pytest.raises(ValueError, match="grid_dims names unknown"):
        SearchSpace(grid_dims=["nope"])


def test_constant_dimensions_are_not_suggested_and_grid_holds_the_rest_at_defaults():
    space = SearchSpace(stages=[StageSpace(type="ds", stride=1, widths=[8], kernels=[3], depths=[1],
                                           se=[0.0], acts=["r6"])], grid_dims=["resolution"])
    assert not any(name.startswith("s0_") for name in space.searched())
    trial = optuna.create_study(sampler=make_sampler("grid", space)).ask()
    params = suggest_params(trial, space, only=set(space.grid_dims))
    assert set(trial.params) == {"resolution"}
    assert params["lr"] == space.lr.default and params["head_width"] == space.head_widths[0]


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_drives_the_space(name):
    space = SearchSpace()
    directions = ["maximize", "minimize"] if name == "nsga2" else ["maximize"]
    study = optuna.create_study(sampler=make_sampler(name, space, seed=0), directions=directions)
    for i in range(4):
        trial = study.ask()
        plan = plan_from_params(suggest_params(trial, space, set(space.grid_dims) if name == "grid" else None),
                                space)
        study.tell(trial, [float(i), 1.0] if name == "nsga2" else float(len(plan.arch)))
    assert len(study.trials) == 4


# ------------------------------------------------------------------------------------------ score


def test_combined_score_rewards_cheap_models_and_is_accuracy_at_target():
    t = ScoreTargets(mflops=4.0, kparams=40.0, w_flops=-0.07, w_params=-0.07)
    assert combined_score(0.9, 4.0, 40.0, t) == pytest.approx(0.9)
    # Half the FLOPs earns 2**0.07 (~ +5%); twice the parameters costs the same factor.
    assert combined_score(0.9, 2.0, 40.0, t) == pytest.approx(0.9 * 2**0.07)
    assert combined_score(0.9, 4.0, 80.0, t) == pytest.approx(0.9 / 2**0.07)
    assert combined_score(0.9, 4.0, 40.0, t, latency_ms=0.4) == pytest.approx(0.9 * (0.4 / t.latency_ms) ** -0.07)


def test_trial_costs_are_the_models_own_counts_before_training():
    plan = plan_from_params({"resolution": 48}, SearchSpace())
    costs = trial_costs(plan, 2)
    model = create_model("saofu_fu", num_classes=2)
    assert costs.kparams == pytest.approx(count_params(model) / 1e3)
    assert costs.mflops == pytest.approx(count_flops(model, 48) / 1e6)


# ------------------------------------------------------------------------------------------ report


def _row(n, state, acc, mflops, kparams, score=None, seconds=1.0, epochs=1, completed=None):
    return {"number": n, "state": state, "accuracy": acc, "mflops": mflops, "kparams": kparams,
            "latency_ms": None, "score": score, "seconds": seconds, "epochs": epochs,
            "completed": completed if completed is not None else float(n), "params": {}, "arch": None}


def test_pareto_front_keeps_exactly_the_non_dominated_finished_trials():
    rows = [
        _row(0, "COMPLETE", 0.90, 4.0, 30.0),
        _row(1, "COMPLETE", 0.85, 2.0, 20.0),   # cheaper, less accurate: on the front
        _row(2, "COMPLETE", 0.84, 3.0, 25.0),   # dominated by 1
        _row(3, "COMPLETE", 0.95, 8.0, 10.0),   # most accurate: on the front
        _row(4, "PRUNED", 0.99, 0.1, 1.0),      # pruned: never on the front
        _row(5, "COMPLETE", 0.90, 4.0, 30.0),   # equal to 0: neither dominates, both stay
    ]
    assert sorted(r["number"] for r in pareto_front(rows)) == [0, 1, 3, 5]


def test_best_row_is_the_highest_score_among_finished_and_fails_clearly_without_any():
    rows = [_row(0, "COMPLETE", 0.9, 1, 1, score=0.8), _row(1, "PRUNED", 0.5, 1, 1, score=0.95),
            _row(2, "COMPLETE", 0.9, 1, 1, score=0.85)]
    assert best_row(rows)["number"] == 2
    with pytest.raises(SaofuError, match="no search trial finished"):
        best_row([_row(0, "PRUNED", 0.5, 1, 1, score=0.9)])


def test_best_row_within_hard_limits_skips_a_higher_scoring_trial_over_them():
    rows = [_row(0, "COMPLETE", 0.95, 4.0, 30.0, score=0.90),   # best score, over the FLOP limit
            _row(1, "COMPLETE", 0.88, 1.5, 39.0, score=0.86),
            _row(2, "COMPLETE", 0.90, 1.7, 45.0, score=0.87)]   # over the parameter limit
    assert best_row(rows)["number"] == 0
    assert best_row(rows, max_mflops=1.75, max_kparams=40.5)["number"] == 1
    with pytest.raises(SaofuError, match="within 1.0 MFLOPs.*smallest: 1.50 MFLOPs"):
        best_row(rows, max_mflops=1.0)


def test_rebuild_plan_refuses_params_that_do_not_give_the_logged_arch():
    row = _row(0, "COMPLETE", 0.9, 1, 1) | {"params": {"s1_kernel": 5}, "arch": SAOFU_FU_ARCH}
    with pytest.raises(SaofuError, match="rebuild"):
        rebuild_plan(row, SearchSpace())
    row["params"] = {}
    assert rebuild_plan(row, SearchSpace()).arch == SAOFU_FU_ARCH


def test_best_so_far_counts_pruned_compute_but_only_finished_scores():
    rows = [_row(0, "COMPLETE", 0.9, 1, 1, score=0.5, seconds=2, epochs=4),
            _row(1, "PRUNED", 0.9, 1, 1, score=0.9, seconds=1, epochs=1),
            _row(2, "COMPLETE", 0.9, 1, 1, score=0.7, seconds=3, epochs=4)]
    assert best_so_far(rows) == [(2.0, 4, 0.5), (3.0, 5, 0.5), (6.0, 9, 0.7)]


# ------------------------------------------------------------------------------------------ scaling


def test_compound_scaling_reaches_a_flop_target_in_both_directions():
    base = scale_once(SAOFU_FU_ARCH, 64, 0.0)
    assert base.arch == SAOFU_FU_ARCH and base.image_size == 64
    up = compound_scale(SAOFU_FU_ARCH, 64, target_mflops=16.0)
    down = compound_scale(SAOFU_FU_ARCH, 64, target_mflops=2.0)
    assert up.phi > 0 > down.phi
    assert up.image_size > 64 > down.image_size
    # Integer widths and repeats move FLOPs in steps; the closest step is within ~25%.
    assert math.isclose(up.mflops, 16.0, rel_tol=0.25) and math.isclose(down.mflops, 2.0, rel_tol=0.25)
    model = create_model("saofu_from_arch", num_classes=2, arch=up.arch)
    assert count_flops(model, up.image_size) / 1e6 == pytest.approx(up.mflops)
    with pytest.raises(ValueError, match="outside what phi"):
        compound_scale(SAOFU_FU_ARCH, 64, target_mflops=1e5)


# ------------------------------------------------------------------------------------------ workers


def _study(tmp_path, pruner="none", heartbeat_s=None):
    storage = make_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_s=heartbeat_s)
    study = optuna.create_study(storage=storage, study_name="t", sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=make_pruner(pruner, max_epochs=9), direction="maximize")
    return study, storage


def test_the_worker_runs_exactly_n_trials_and_a_resumed_study_adds_none(tmp_path):
    study, storage = _study(tmp_path)
    ran = run_worker(study, storage, lambda t: t.suggest_float("x", 0, 1), n_trials=5, log=lambda s: None)
    assert ran == [0, 1, 2, 3, 4]
    assert run_worker(study, storage, lambda t: 0.0, n_trials=5, log=lambda s: None) == []
    assert len(study.trials) == 5


def test_hyperband_prunes_trials_whose_curves_lag(tmp_path):
    study, storage = _study(tmp_path, pruner="hyperband")

    def objective(trial):
        quality = trial.suggest_float("q", 0, 1)
        for epoch in range(1, 10):
            trial.report(quality * epoch / 9, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return quality

    run_worker(study, storage, objective, n_trials=30, log=lambda s: None)
    states = [t.state for t in study.trials]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(states) == 30 and pruned
    # Pruning saves compute: the study trained well under 30 full budgets.
    assert sum(max(t.intermediate_values) for t in study.trials) < 0.7 * 30 * 9


def test_a_stale_trial_is_failed_and_retried_with_the_same_params(tmp_path):
    study, storage = _study(tmp_path, heartbeat_s=1)
    storage_view = make_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_s=1, grace_s=1)
    dead = study.ask()  # a worker that claimed a trial and died: no heartbeat, never told
    x = dead.suggest_float("x", 0, 1)
    storage.record_heartbeat(dead._trial_id)
    import time

    time.sleep(2.5)
    study2 = optuna.load_study(study_name="t", storage=storage_view)
    seen = []
    run_worker(study2, storage_view, lambda t: seen.append(t.suggest_float("x", 0, 1)) or 1.0, n_trials=2,
               log=lambda s: None)
    states = {t.number: t.state.name for t in study2.trials}
    assert states[0] == "FAIL"
    assert x in seen  # the retry ran the dead trial's parameters
    counting = counting_trials(study2.get_trials())
    assert len(counting) == 2 and all(t.state.name == "COMPLETE" for t in counting)


def test_a_broken_objective_stops_the_worker_after_a_few_errors(tmp_path):
    study, storage = _study(tmp_path)

    def broken(trial):
        raise RuntimeError("no data")

    with pytest.raises(SaofuError, match="3 trials in a row failed.*no data"):
        run_worker(study, storage, broken, n_trials=10, log=lambda s: None)
    assert [t.user_attrs["error"] for t in study.trials] == ["RuntimeError: no data"] * 3


def _first_params(tmp_path, name: str, **job_fields) -> dict:
    from tasks.search.worker import SearchJob, open_study

    job = SearchJob(study_name=name, storage=f"sqlite:///{tmp_path / (name + '.db')}", data_dir="", sampler="random",
                    **job_fields)
    study, _ = open_study(job)
    return suggest_params(study.ask(), job.space)


def test_the_sampler_seed_decouples_proposals_from_the_data_seed(tmp_path):
    # The bench gives each study its own sampler seed while data split and init stay on `seed`:
    # with one seed, TPE's start-up trials would be random search's first trials exactly.
    from bench.search import STUDIES, study_sampler_seed

    same = _first_params(tmp_path, "a", seed=0), _first_params(tmp_path, "b", seed=0)
    assert same[0] == same[1]
    assert _first_params(tmp_path, "c", seed=0, sampler_seed=7) != same[0]
    assert _first_params(tmp_path, "d", seed=5, sampler_seed=7) == _first_params(tmp_path, "e", seed=0, sampler_seed=7)
    seeds = {study_sampler_seed(s, i) for s in range(3) for i in range(len(STUDIES))}
    assert len(seeds) == 3 * len(STUDIES)


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


@pytest.mark.parametrize(("epochs", "state", "trained"), [(2, "PRUNED", 1), (1, "COMPLETE", 1)])
def test_a_trial_is_never_pruned_at_its_last_epoch(epochs, state, trained):
    # Hyperband's top rung is the full budget: pruning there saves nothing and throws away a
    # full-budget score, so the objective asks the pruner before every epoch but the last.
    import torch

    from tasks.data.loading import TensorSplit
    from tasks.search.objective import Objective

    def data_for(size):
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=g)
        split = TensorSplit(images, torch.tensor([0, 1] * 4), ["a", "b"], [str(i) for i in range(8)])
        return split, split

    study = optuna.create_study(direction="maximize", pruner=_AlwaysPrune(),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(Objective(space=SearchSpace(), data_for=data_for, epochs=epochs), n_trials=1)
    (trial,) = study.trials
    assert trial.state.name == state
    assert trial.user_attrs["epochs"] == trained
