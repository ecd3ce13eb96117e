"""The promotion gate: may the challenger replace the champion? Pure Python, no MLflow.

Both models are measured by the caller on the same fresh online slice; the challenger is the
artefact that would ship (the INT8 ONNX graph, not the float model), so its numbers are the
phone's numbers. The gate passes only when every check passes:

* accuracy: not worse than the champion's by more than `overall_margin`, both counted on the
  images of the classes both models know (see "A class change" below);
* recall[c], for every class the champion recognises: not worse by more than `class_margin`
  (a class the challenger lost fails here);
* new_class_recall[c], for every class the champion lacks and for the named `new_class`:
  at least `new_class_recall` (a new class has nothing to be compared with, only a target);
* parent_recall[c->p], for a new class `c` that refines a champion class `p` (`fu_merchant`
  refines `fu`): on the images of `c`, the share the challenger answers `c` or `p` (any class
  whose refinement chain reaches `p`) is not worse than the share the champion answered `p` by
  more than `class_margin` (users whose merchant 福 was accepted as a 福 still are);
* latency_p95_ms and size_bytes: within the phone's budget.

With no champion (the first deployment) the comparisons pass with a note; targets and budgets
still apply. Each check stands alone, so the report says exactly what held a challenger back.

A class change (a fast retrain adds `fu_merchant`, or corrects a class). The two models are
compared only on what both know: per-class recall on the shared classes, and accuracy on the
images whose true class both models have (from each model's `confusion` on the slice). Images of
a class the champion lacks are left out of that comparison for both models: the champion cannot
answer them right, so counting them would push its accuracy down and "penalise" it into letting
the challenger pass; the challenger's answers on them are judged by the new class's own recall
target instead. Where the new class refines a champion class, the champion's expected answer
on those images is that parent class, and `parent_recall` compares the two models there in the
champion's terms (the challenger counts right with the new class or the parent). Whether a plain
`fu` image called `fu_merchant` by the challenger is an error stays strict: on the classes both
know, each model is judged by its own decision, so such an answer lowers the challenger's
`recall[fu]`. The refinement map is the graphs' `refines` metadata (challenger over champion)
with `GateConfig.refines` on top; with no map a new class has no parent and only its target.
Without `confusion` (hand-made metrics, old reports) the reported `accuracy` is compared as is.

The gate knows no class by name: the checks are over whatever classes the dataset has. A negative
class (`not_fu` in the Fu world) matters only upstream, in the decisions the recalls are counted
from (`tasks.release.evaluation.decide`), and only for a model that has it; otherwise
low-confidence predictions abstain and count as wrong.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from saofu.refines import known_ancestor

# Metrics go through float arithmetic (0.90 - 0.02 is 0.8800000000000001): a value exactly at
# its limit must pass, so comparisons allow this much slack.
TOLERANCE = 1e-9


class GateConfig(BaseModel):
    """Margins, targets and budgets the challenger must meet."""

    overall_margin: float = Field(0.0, ge=0, le=1, description="largest allowed accuracy drop vs the champion")
    class_margin: float = Field(0.02, ge=0, le=1, description="largest allowed recall drop on any champion class")
    new_class: str | None = Field(None, description="a class this release adds; it must reach new_class_recall")
    new_class_recall: float = Field(0.9, ge=0, le=1, description="recall target of a class the champion lacks")
    max_latency_ms: float = Field(1.0, gt=0, description="budget on p95 latency: batch 1, 1 thread, onnxruntime")
    # A tiny INT8 recogniser is tens of kilobytes; a megabyte means something went wrong.
    max_size_bytes: int = Field(1_000_000, gt=0, description="budget on the shipped ONNX file's size")
    refines: dict[str, str] = Field(
        default_factory=dict, description="new class -> the class it refines (e.g. fu_merchant -> fu), on top of "
                                          "what the graphs' `refines` metadata says"
    )


class CandidateMetrics(BaseModel):
    """One model's numbers on the gate's slice (use the same slice for challenger and champion)."""

    accuracy: float = Field(ge=0, le=1)
    per_class_recall: dict[str, float] = Field(min_length=1, description="recall of every class the model knows "
                                                                         "(and of no other)")
    latency_p50_ms: float = Field(ge=0)
    latency_p95_ms: float = Field(ge=0)
    size_bytes: int = Field(ge=0)
    n_images: int | None = Field(None, ge=0, description="size of the slice, for the report")
    version: str | None = Field(None, description="registered model version, for the report")
    confusion: dict[str, dict[str, int]] | None = Field(
        None, description="true class -> the model's decision -> images on the slice ('' for an abstention); "
                          "rows for the slice's classes the model lacks too. Lets the gate count accuracy on the "
                          "classes both models know"
    )
    refines: dict[str, str] = Field(default_factory=dict, description="the graph's `refines` metadata: "
                                                                      "class -> the class it refines")

    def to_tags(self) -> dict[str, str]:
        """Flat `metric.*` tags for a registered model version (MLflow tags are strings)."""
        tags = {
            "metric.accuracy": f"{self.accuracy:.6g}",
            "metric.latency_p50_ms": f"{self.latency_p50_ms:.6g}",
            "metric.latency_p95_ms": f"{self.latency_p95_ms:.6g}",
            "metric.size_bytes": str(self.size_bytes),
        }
        tags |= {f"metric.recall.{cls}": f"{value:.6g}" for cls, value in sorted(self.per_class_recall.items())}
        if self.n_images is not None:
            tags["metric.n_images"] = str(self.n_images)
        return tags


class GateCheck(BaseModel):
    """One check: `value op limit` held or not. `value`/`limit` are None where there is no number."""

    name: str
    value: float | None
    op: Literal[">=", "<=", ""]
    limit: float | None
    passed: bool
    detail: str = ""


class GateReport(BaseModel):
    """Every check with its numbers, the verdict, and what was compared under which config."""

    checks: list[GateCheck]
    passed: bool
    summary: str
    config: GateConfig
    challenger: CandidateMetrics
    champion: CandidateMetrics | None

    @property
    def failed(self) -> list[GateCheck]:
        return [check for check in self.checks if not check.passed]

    def to_dict(self) -> dict:
        """JSON-ready (what is logged, and what `GateReport.model_validate` reads back)."""
        return self.model_dump(mode="json")

    def table(self) -> str:
        """The checks as a fixed-width text table, with the summary underneath."""
        rows = [("check", "value", "", "limit", "result", "detail")]
        rows += [
            (c.name, _fmt(c.value), c.op, _fmt(c.limit), "pass" if c.passed else "FAIL", c.detail)
            for c in self.checks
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5] for row in rows]
        return "\n".join(line.rstrip() for line in lines) + "\n" + self.summary


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4f}"


def _at_least(name: str, value: float, limit: float, detail: str = "") -> GateCheck:
    return GateCheck(name=name, value=value, op=">=", limit=limit, passed=value >= limit - TOLERANCE, detail=detail)


def _at_most(name: str, value: float, limit: float, detail: str = "") -> GateCheck:
    return GateCheck(name=name, value=value, op="<=", limit=limit, passed=value <= limit + TOLERANCE, detail=detail)


def merged_refines(challenger: CandidateMetrics, champion: CandidateMetrics | None,
                   config: GateConfig) -> dict[str, str]:
    """The refinement map the gate uses: the champion's metadata, the challenger's over it, the config's last."""
    return {**(champion.refines if champion is not None else {}), **challenger.refines, **config.refines}


def _images(metrics: CandidateMetrics, truths: set[str]) -> tuple[int, int]:
    """(right, all) decisions of `metrics` on the images whose true class is in `truths`."""
    rows = {truth: row for truth, row in (metrics.confusion or {}).items() if truth in truths}
    return sum(row.get(truth, 0) for truth, row in rows.items()), sum(sum(row.values()) for row in rows.values())


def _accuracy_check(challenger: CandidateMetrics, champion: CandidateMetrics, config: GateConfig) -> GateCheck:
    """Accuracy on the images of the classes both know (with both confusions), else the reported accuracy."""
    margin = f"margin {config.overall_margin}"
    if challenger.confusion is None or champion.confusion is None:
        return _at_least("accuracy", challenger.accuracy, champion.accuracy - config.overall_margin,
                         f"champion {champion.accuracy:.4f}, {margin}")
    shared = set(challenger.per_class_recall) & set(champion.per_class_recall)
    right_ch, n_ch = _images(challenger, shared)
    right_champ, n_champ = _images(champion, shared)
    if not n_ch or not n_champ:
        return GateCheck(name="accuracy", value=None, op="", limit=None, passed=True,
                         detail=f"the slice has no images of the classes both know ({', '.join(sorted(shared))})")
    value, reference = right_ch / n_ch, right_champ / n_champ
    total = sum(sum(row.values()) for row in challenger.confusion.values())
    where = "" if n_ch == total else (f" on the {n_ch} of {total} images of the classes both know "
                                      f"({', '.join(sorted(shared))})")
    return _at_least("accuracy", value, reference - config.overall_margin,
                     f"champion {reference:.4f}, {margin}{where}")


def _comparison_checks(challenger: CandidateMetrics, champion: CandidateMetrics | None,
                       config: GateConfig) -> list[GateCheck]:
    """Accuracy and per-class recall against the champion (notes only when there is none)."""
    if champion is None:
        note = "no champion to compare with (first deployment)"
        return [
            GateCheck(name="accuracy", value=challenger.accuracy, op="", limit=None, passed=True, detail=note),
            GateCheck(name="recall[*]", value=None, op="", limit=None, passed=True, detail=note),
        ]
    checks = [_accuracy_check(challenger, champion, config)]
    for cls, champion_recall in sorted(champion.per_class_recall.items()):
        name = f"recall[{cls}]"
        if cls not in challenger.per_class_recall:
            checks.append(GateCheck(name=name, value=None, op=">=", limit=champion_recall - config.class_margin,
                                    passed=False, detail=f"the champion recognises '{cls}'; the challenger lacks it"))
            continue
        checks.append(_at_least(name, challenger.per_class_recall[cls], champion_recall - config.class_margin,
                                f"champion {champion_recall:.4f}, margin {config.class_margin}"))
    return checks


def _parent_check(cls: str, challenger: CandidateMetrics, champion: CandidateMetrics, config: GateConfig,
                  refines: dict[str, str]) -> GateCheck | None:
    """parent_recall[cls->parent] for a new class that refines a champion class; None where not measurable."""
    known = frozenset(champion.per_class_recall)
    parent = known_ancestor(refines[cls], known, refines) if cls in refines else None
    if parent is None or challenger.confusion is None or champion.confusion is None:
        return None
    row_ch, row_champ = challenger.confusion.get(cls, {}), champion.confusion.get(cls, {})
    n_ch, n_champ = sum(row_ch.values()), sum(row_champ.values())
    if not n_ch or not n_champ:
        return None  # no images of the class: its recall target already fails, with the reason
    value = sum(n for decision, n in row_ch.items() if decision and known_ancestor(decision, known, refines) == parent)
    reference = row_champ.get(parent, 0) / n_champ
    return _at_least(f"parent_recall[{cls}->{parent}]", value / n_ch, reference - config.class_margin,
                     f"images of '{cls}' answered '{cls}' or '{parent}'; champion answered '{parent}' on "
                     f"{reference:.4f}, margin {config.class_margin}")


def _new_class_checks(challenger: CandidateMetrics, champion: CandidateMetrics | None,
                      config: GateConfig) -> list[GateCheck]:
    """The recall target for each class the champion lacks and for the named new class, and the
    parent check for each that refines a champion class."""
    new = set(challenger.per_class_recall) - set(champion.per_class_recall) if champion is not None else set()
    if config.new_class is not None:
        new.add(config.new_class)
    refines = merged_refines(challenger, champion, config)
    checks = []
    for cls in sorted(new):
        name = f"new_class_recall[{cls}]"
        if cls not in challenger.per_class_recall:
            checks.append(GateCheck(name=name, value=None, op=">=", limit=config.new_class_recall, passed=False,
                                    detail=f"the named new class '{cls}' is not among the challenger's classes"))
            continue
        detail = "named new class" if cls == config.new_class else "class the champion lacks"
        if challenger.confusion is not None and not sum(challenger.confusion.get(cls, {}).values()):
            detail += f"; the slice has no images of '{cls}'"
        checks.append(_at_least(name, challenger.per_class_recall[cls], config.new_class_recall, detail))
        if champion is not None and cls not in champion.per_class_recall:
            parent = _parent_check(cls, challenger, champion, config, refines)
            if parent is not None:
                checks.append(parent)
    return checks


def _summary(checks: list[GateCheck]) -> str:
    failed = [check.name for check in checks if not check.passed]
    if not failed:
        return f"gate passed: all {len(checks)} checks"
    return f"gate failed: {len(failed)} of {len(checks)} checks ({', '.join(failed)})"


def evaluate_gate(challenger: CandidateMetrics, champion: CandidateMetrics | None,
                  config: GateConfig | None = None) -> GateReport:
    """Judge the challenger against the champion (None: first deployment) under `config`.

    Returns:
        The report: every check, `passed` only when all of them passed.
    """
    config = config or GateConfig()
    checks = _comparison_checks(challenger, champion, config)
    checks += _new_class_checks(challenger, champion, config)
    checks.append(_at_most("latency_p95_ms", challenger.latency_p95_ms, config.max_latency_ms,
                           f"p50 {challenger.latency_p50_ms:.4f} ms"))
    checks.append(_at_most("size_bytes", challenger.size_bytes, config.max_size_bytes))
    return GateReport(checks=checks, passed=all(check.passed for check in checks), summary=_summary(checks),
                      config=config, challenger=challenger, champion=champion)
