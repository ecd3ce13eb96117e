"""What a finished study says: a table of trials, the Pareto front, its plot, and the best trial.

The Pareto front is taken over finished (not pruned) trials: maximise accuracy, minimise MFLOPs,
kparams and, where measured, INT8 latency. A pruned trial's accuracy is that of a shorter training,
not comparable with finished ones.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from saofu.errors import SaofuError
from tasks.search.objective import ScoreTargets, combined_score
from tasks.search.space import SearchSpace, TrialPlan, plan_from_params
from tasks.search.study import counting_trials

# (metric, sense): +1 higher is better, -1 lower is better.
PARETO_METRICS = (("accuracy", 1), ("mflops", -1), ("kparams", -1), ("latency_ms", -1))


def trial_rows(study: optuna.Study, targets: ScoreTargets) -> list[dict]:
    """One row per counting trial (retried ones left out), in trial-number order."""
    rows = []
    for t in counting_trials(study.get_trials(deepcopy=False)):
        a = t.user_attrs
        row = {
            "number": t.number, "state": t.state.name, "arch": a.get("arch"), "resolution": a.get("resolution"),
            "params": dict(t.params),
            "accuracy": a.get("accuracy"), "mflops": a.get("mflops"), "kparams": a.get("kparams"),
            "latency_ms": a.get("latency_ms"), "epochs": a.get("epochs", 0), "seconds": a.get("seconds", 0.0),
            "worker": a.get("worker"), "mlflow_run_id": a.get("mlflow_run_id"),
            "completed": t.datetime_complete.timestamp() if t.datetime_complete else None,
        }
        row["score"] = (
            combined_score(row["accuracy"], row["mflops"], row["kparams"], targets, row["latency_ms"])
            if row["accuracy"] is not None and row["mflops"] else None
        )
        rows.append(row)
    return rows


def pareto_front(rows: list[dict]) -> list[dict]:
    """The finished rows no other finished row beats on every metric (and strictly on one)."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r["accuracy"] is not None]
    metrics = [(m, sense) for m, sense in PARETO_METRICS if all(r.get(m) is not None for r in done)]

    def dominates(a: dict, b: dict) -> bool:
        at_least = all(sense * a[m] >= sense * b[m] for m, sense in metrics)
        better = any(sense * a[m] > sense * b[m] for m, sense in metrics)
        return at_least and better

    return [r for r in done if not any(dominates(o, r) for o in done if o is not r)]


def plot_pareto(rows: list[dict], path: str | Path, title: str = "search") -> Path:
    """Accuracy vs MFLOPs and vs kparams; finished, pruned and Pareto-front trials marked apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = {r["number"] for r in pareto_front(rows)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, cost, label in ((axes[0], "mflops", "MFLOPs (MACs)"), (axes[1], "kparams", "parameters (k)")):
        for state, style in (("PRUNED", dict(c="lightgray", marker="x", label="pruned (last epoch)")),
                             ("COMPLETE", dict(c="tab:blue", marker="o", alpha=0.6, label="finished"))):
            pts = [r for r in rows if r["state"] == state and r["accuracy"] is not None and r[cost]]
            ax.scatter([r[cost] for r in pts], [r["accuracy"] for r in pts], s=28, **style)
        pts = sorted((r for r in rows if r["number"] in front), key=lambda r: r[cost])
        ax.scatter([r[cost] for r in pts], [r["accuracy"] for r in pts], s=60, facecolors="none",
                   edgecolors="tab:red", linewidths=1.5, label="Pareto front")
        for r in pts:
            ax.annotate(str(r["number"]), (r[cost], r["accuracy"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{title}: {sum(r['state'] == 'COMPLETE' for r in rows)} finished, "
                 f"{sum(r['state'] == 'PRUNED' for r in rows)} pruned, front of {len(front)}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def best_row(rows: list[dict], max_mflops: float | None = None, max_kparams: float | None = None) -> dict:
    """The finished trial with the highest combined score (for NSGA-II: the best of its front).

    The score's cost terms are soft: a trial over a cost target can still score best. Hard limits
    (a phone's budget) are given as `max_mflops`/`max_kparams`: then only trials within them count.

    Raises:
        SaofuError: no trial finished (all pruned or failed, or the budget ended first), or none
            within the limits.
    """
    done = [r for r in rows if r["state"] == "COMPLETE" and r["score"] is not None]
    if not done:
        states = sorted({r["state"] for r in rows})
        raise SaofuError(f"no search trial finished (trial states: {states or 'none'}); "
                         "raise the time budget or the trial count")
    within = [r for r in done if (max_mflops is None or r["mflops"] <= max_mflops)
              and (max_kparams is None or r["kparams"] <= max_kparams)]
    if not within:
        raise SaofuError(f"none of the {len(done)} finished trials is within {max_mflops} MFLOPs and "
                         f"{max_kparams} kparams (smallest: {min(r['mflops'] for r in done):.2f} MFLOPs, "
                         f"{min(r['kparams'] for r in done):.1f} kparams)")
    return max(within, key=lambda r: r["score"])


def rebuild_plan(row: dict, space: SearchSpace) -> TrialPlan:
    """The trial's plan from its logged parameters; checks it gives the logged architecture."""
    plan = plan_from_params(row["params"], space)
    if row.get("arch") and plan.arch != row["arch"]:
        raise SaofuError(f"trial {row['number']}: parameters rebuild {plan.arch}, but it logged {row['arch']}")
    return plan


def best_so_far(rows: list[dict]) -> list[tuple[float, int, float]]:
    """(cumulative train seconds, cumulative epochs, best score so far) after each trial, in finishing order.

    Pruned trials add their compute but no score: the best score counts finished trials only.
    """
    done = sorted((r for r in rows if r["state"] in ("COMPLETE", "PRUNED") and r["completed"] is not None),
                  key=lambda r: r["completed"])
    seconds, epochs, best, curve = 0.0, 0, float("-inf"), []
    for r in done:
        seconds += r["seconds"] or 0.0
        epochs += r["epochs"] or 0
        if r["state"] == "COMPLETE" and r["score"] is not None:
            best = max(best, r["score"])
        curve.append((seconds, epochs, best))
    return curve


def format_trials(rows: list[dict], limit: int = 15) -> str:
    """The best `limit` trials by score, one line each."""
    head = f"{'#':>4} {'state':<9}{'score':>7}{'acc':>7}{'MFLOPs':>8}{'kparams':>8}{'epochs':>7}  arch @ res"
    lines = [head, "-" * len(head)]
    shown = sorted(rows, key=lambda r: (r["score"] is None, -(r["score"] or 0)))[:limit]
    for r in shown:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"{r['number']:>4} {r['state']:<9}{fmt(r['score'], '7.4f')}{fmt(r['accuracy'], '7.3f')}"
                     f"{fmt(r['mflops'], '8.2f')}{fmt(r['kparams'], '8.1f')}{r['epochs']:>7}  "
                     f"{r['arch']} @ {r['resolution']}")
    return "\n".join(lines)
