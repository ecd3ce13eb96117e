"""`saofu bench search`: what the search finds, and what Hyperband saves, measured in one run.

1. Pruning at equal compute. Three studies on the same data, each given the same wall-clock budget
   on the same machine, one worker each: TPE + Hyperband (the default), TPE without pruning, and
   random sampling without pruning. Compute is the trials' summed training seconds (a pruned
   trial adds what it trained). Reported: each study's best combined score against compute (table
   and plot), and the compute each needed to reach random search's final best score; the target
   is Hyperband needing at most 1/3 of random search's compute.
2. Searched model vs baselines. The best trial of the Hyperband study is retrained at full budget
   and measured beside saofu_fu (hand-made) and the torchvision baselines, all trained with the
   same epochs on the same Fu world and tested on held-out fonts: accuracy at threshold 0.9,
   params, MFLOPs, FP32 and INT8 onnxruntime latency. Target: at least the best baseline's
   accuracy with at most 1/10 of mobilenet_v3_small 0.5's parameters and no more of its FLOPs.

The searched model keeps the hyper-parameters its trial found; the baselines use the training
defaults (`TrainConfig`), which were tuned for them in the models benchmark.

Run it: `python -m bench.search --help` or `saofu bench search`. One run is one draw; several
seeds' results are put side by side by `bench/search_seeds.py` (`saofu bench search-seeds`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.models import BENCH_MODELS, SIZE, _device_name, format_table, train_and_measure
from saofu.errors import SaofuError
from saofu.settings import get_settings
from tasks.data.fu_world import WorldConfig, world_folder_name
from tasks.data.loading import prepare_dataset
from tasks.search.objective import ScoreTargets
from tasks.search.report import best_row, best_so_far, rebuild_plan, trial_rows
from tasks.search.worker import SearchJob, open_study, run_job_worker
from tasks.train.loop import TrainConfig

STUDIES = (  # (label, sampler, pruner)
    ("tpe + hyperband", "tpe", "hyperband"),
    ("tpe, no pruning", "tpe", "none"),
    ("random, no pruning", "random", "none"),
)
TARGET_COMPUTE_SHARE = 1 / 3
BASELINE = "mobilenet_v3_small_050"  # the model the size target is relative to
# The issue's size limits: mobilenet_v3_small 0.5's FLOPs at 64 px and a tenth of its parameters
# (bench/results/models.json: 1.75 MFLOPs, 405 k params).
LIMIT_MFLOPS, LIMIT_KPARAMS = 1.75, 40.5


def study_sampler_seed(seed: int, index: int) -> int:
    """Each study's sampler seed: distinct per study and per bench seed.

    With one seed, TPE's random start-up trials are exactly random search's first trials, so a
    lucky early draw is "reached" by every study at once and the comparison says nothing.
    """
    return seed * len(STUDIES) + index


def compute_to_reach(curve: list[tuple[float, int, float]], score: float) -> float | None:
    """Training seconds a study had spent when its best score first reached `score` (None: never)."""
    return next((seconds for seconds, _, best in curve if best >= score - 1e-12), None)


def run_study(label: str, sampler: str, pruner: str, data_dir: str, budget_s: float, epochs: int,
              targets: ScoreTargets, seed: int, storage_dir: Path, sampler_seed: int | None = None) -> dict:
    """One study of the comparison; `seed` fixes data split and weight init, `sampler_seed` the sampler."""
    name = label.replace(" ", "").replace(",", "-").replace("+", "-")
    job = SearchJob(
        study_name=name, storage=f"sqlite:///{storage_dir / (name + '.db')}", data_dir=data_dir, sampler=sampler,
        pruner=pruner, n_trials=100_000, timeout_s=budget_s, epochs=epochs, targets=targets, seed=seed,
        sampler_seed=sampler_seed,
    )
    print(f"== study {label}: {budget_s / 60:.1f} min budget, trials of up to {epochs} epochs", flush=True)
    run_job_worker(job)
    study, _ = open_study(job)
    rows = trial_rows(study, targets)
    curve = best_so_far(rows)
    return {"label": label, "sampler": sampler, "pruner": pruner, "rows": rows, "curve": curve,
            "trials": len(rows), "finished": sum(r["state"] == "COMPLETE" for r in rows),
            "pruned": sum(r["state"] == "PRUNED" for r in rows),
            "compute_s": curve[-1][0] if curve else 0.0, "epochs_trained": curve[-1][1] if curve else 0,
            "best_score": curve[-1][2] if curve else None}


def plot_curves(studies: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s in studies:
        pts = [(sec, best) for sec, _, best in s["curve"] if best > float("-inf")]
        if pts:
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post",
                    label=f"{s['label']} ({s['trials']} trials)")
    ax.set_xlabel("compute spent (summed trial training seconds)")
    ax.set_ylabel("best combined score so far")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("search at equal compute")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_studies(studies: list[dict], reference: float | None) -> str:
    head = (f"{'study':<20}{'trials':>7}{'finished':>9}{'pruned':>7}{'epochs':>7}{'compute s':>10}"
            f"{'best score':>11}{'s to reach random best':>24}{'share':>7}")
    lines = [head, "-" * len(head)]
    for s in studies:
        reach = s.get("compute_to_random_best")
        share = s.get("share_of_random_compute")
        lines.append(
            f"{s['label']:<20}{s['trials']:>7}{s['finished']:>9}{s['pruned']:>7}{s['epochs_trained']:>7}"
            f"{s['compute_s']:>10.0f}{(s['best_score'] or float('nan')):>11.4f}"
            f"{'never' if reach is None else f'{reach:.0f}':>24}{'' if share is None else f'{share:.2f}':>7}"
        )
    if reference is not None:
        lines.append(f"random search's final best score: {reference:.4f}")
    return "\n".join(lines)


def run_search_bench(
    n: int = WorldConfig.n, budget_min: float = 12.0, trial_epochs: int = 9, final_epochs: int = TrainConfig.epochs,
    seed: int = 0, out: str | Path = "bench/results/search.json", baselines: Sequence[str] = BENCH_MODELS,
    targets: ScoreTargets | None = None, search_n: int = 1500,
) -> dict:
    """Run the three studies and the searched-vs-baselines comparison; write JSON (and a plot) to `out`.

    The studies search on a smaller world (`search_n` images; trials must be cheap for a study to
    hold enough of them) than the final comparison trains on (`n`, the models benchmark's world).
    """
    started = time.perf_counter()
    settings = get_settings()
    # The size limits as the score's targets.
    targets = targets or ScoreTargets(mflops=LIMIT_MFLOPS, kparams=LIMIT_KPARAMS)
    from tasks.train.steps import generate_fu_world

    data_dir = generate_fu_world.fn(str(settings.data_dir / world_folder_name(n, seed, SIZE)), n, seed, SIZE)
    search_dir = generate_fu_world.fn(str(settings.data_dir / world_folder_name(search_n, seed, SIZE)), search_n,
                                      seed, SIZE)
    out = Path(out)

    # 1. the three studies at equal compute
    with tempfile.TemporaryDirectory(prefix="saofu-bench-search-") as tmp:
        studies = [run_study(label, sampler, pruner, search_dir, budget_min * 60, trial_epochs, targets, seed,
                             Path(tmp), sampler_seed=study_sampler_seed(seed, i))
                   for i, (label, sampler, pruner) in enumerate(STUDIES)]
    random_study = next(s for s in studies if s["sampler"] == "random")
    reference = random_study["best_score"]
    for s in studies:
        reach = compute_to_reach(s["curve"], reference) if reference is not None else None
        s["compute_to_random_best"] = reach
        s["share_of_random_compute"] = (reach / random_study["compute_s"]
                                        if reach is not None and random_study["compute_s"] else None)
    curves_png = plot_curves(studies, out.with_name(out.stem + "_curves.png"))
    hyperband = studies[0]
    pruning_target_met = (hyperband["share_of_random_compute"] is not None
                          and hyperband["share_of_random_compute"] <= TARGET_COMPUTE_SHARE)
    print(format_studies(studies, reference), flush=True)

    # 2. the Hyperband study's best within the size limits, retrained, beside the baselines (the
    # score's cost terms are soft, so the top-scoring trial may be over them)
    try:
        best = best_row(hyperband["rows"], max_mflops=LIMIT_MFLOPS, max_kparams=LIMIT_KPARAMS)
        best_within_limits = True
    except SaofuError as exc:
        print(f"warning: {exc}; taking the best trial overall", flush=True)
        best, best_within_limits = best_row(hyperband["rows"]), False
    plan = rebuild_plan(best, SearchJob(study_name="x", storage="sqlite://", data_dir="").space)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        searched_data = prepare_dataset(data_dir, plan.image_size, 0.15, seed, settings.cache_dir)
        rows.append(train_and_measure(plan.train_config(final_epochs, seed, "auto"), searched_data, Path(tmp),
                                      "searched"))
        data64 = prepare_dataset(data_dir, SIZE, 0.15, seed, settings.cache_dir)
        for name in baselines:
            cfg = TrainConfig(model=name, epochs=final_epochs, seed=seed, image_size=SIZE)
            rows.append(train_and_measure(cfg, data64, Path(tmp), name))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    searched = rows[0]
    peers = [r for r in rows[1:] if r["model"] != "saofu_fu"]
    best_peer = max(peers, key=lambda r: r["test_accuracy_at_threshold"]) if peers else None
    small = next((r for r in rows if r["model"] == BASELINE), None)
    size_target = {
        "accuracy_at_least": best_peer["test_accuracy_at_threshold"] if best_peer else None,
        "best_baseline": best_peer["model"] if best_peer else None,
        "params_at_most": small["params"] / 10 if small else None,
        "mflops_at_most": small["mflops"] if small else None,
    }
    size_target_met = bool(
        best_peer and small
        and searched["test_accuracy_at_threshold"] >= size_target["accuracy_at_least"]
        and searched["params"] <= size_target["params_at_most"] and searched["mflops"] <= size_target["mflops_at_most"]
    )

    summary = {
        "benchmark": "search",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": _device_name(),
        "settings": {"world_n": n, "search_world_n": search_n, "budget_min_per_study": budget_min,
                     "trial_epochs": trial_epochs,
                     "final_epochs": final_epochs, "seed": seed, "targets": targets.model_dump(),
                     "compute": "summed trial training seconds, one worker per study, studies run one after another",
                     "sampler_seeds": [study_sampler_seed(seed, i) for i in range(len(STUDIES))]},
        "studies": [{k: v for k, v in s.items() if k != "rows"} for s in studies],
        "pruning_target": {"share_of_random_compute_at_most": TARGET_COMPUTE_SHARE, "met": pruning_target_met},
        "best_trial": {"number": best["number"], "score": best["score"], "arch": plan.arch,
                       "image_size": plan.image_size, "params": best["params"], "mflops": best["mflops"],
                       "kparams": best["kparams"], "within_limits": best_within_limits,
                       "limits": {"mflops": LIMIT_MFLOPS, "kparams": LIMIT_KPARAMS}},
        "models": rows,
        "size_target": {**size_target, "met": size_target_met},
        "curves_png": str(curves_png),
        "total_seconds": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    table = "\n\n".join([
        format_studies(studies, reference),
        f"pruning target (Hyperband reaches random search's best with <= 1/3 of its compute): "
        f"{'met' if pruning_target_met else 'NOT met'}; plot {curves_png}",
        f"best trial {best['number']}{' within the size limits' if best_within_limits else ''}: "
        f"{plan.arch} @ {plan.image_size}px ({best['mflops']:.2f} MFLOPs, {best['kparams']:.1f} kparams)",
        format_table(rows) + "\nlatency: onnxruntime ms, batch 1, one thread",
        (f"size target (>= {size_target['best_baseline']}'s accuracy, <= 1/10 of {BASELINE}'s params, <= its FLOPs): "
         f"{'met' if size_target_met else 'NOT met'}") if best_peer and small
        else f"size target: not judged (it needs {BASELINE} and at least one other baseline in --baselines)",
        f"{summary['device']}; {summary['total_seconds']:.0f} s; written to {out}",
    ])
    return {"summary": summary, "table": table}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=WorldConfig.n, help="images in the generated Fu world")
    p.add_argument("--budget-min", type=float, default=12.0, help="wall-clock budget of each of the three studies")
    p.add_argument("--trial-epochs", type=int, default=9,
                   help="epochs of an unpruned trial; 9 gives Hyperband rungs at 1, 3 and 9 epochs")
    p.add_argument("--search-n", type=int, default=1500, help="images in the world the studies search on")
    p.add_argument("--final-epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--baselines", nargs="*", default=list(BENCH_MODELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/search.json")
    a = p.parse_args(argv)
    result = run_search_bench(a.n, a.budget_min, a.trial_epochs, a.final_epochs, a.seed, a.out, a.baselines,
                              search_n=a.search_n)
    print(result["table"])


if __name__ == "__main__":
    main()
