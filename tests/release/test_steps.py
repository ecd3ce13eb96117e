"""Choosing the artefact to ship: the fastest within the accuracy bar, FP32 or INT8, never by noise."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models import count_flops, count_params, create_model
from saofu.errors import SaofuError
from tasks.data.loading import TensorSplit
from tasks.release import evaluation
from tasks.release.evaluation import measure_latency_interleaved
from tasks.release.quantize import quantize_int8
from tasks.release.steps import Variant, choose_artefact, clearly_faster, measure_variants
from tasks.train.export import export_onnx
from tests.release.fake_clock import FakeClock, durations

# Sizes of saofu_fu and its 25 %- and 50 %-pruned copies (README, `saofu bench release`).
FULL, PRUNED25, PRUNED50 = (34_234, 4.21), (26_514, 3.52), (18_370, 2.63)


def _variant(label: str, p50: float, spread: float = 0.07, acc: float = 0.91, rounds: list[float] | None = None,
             size: tuple[int, float] = FULL) -> Variant:
    """A measured variant: IQR of single runs `spread` × p50 on each side, five round medians at p50."""
    return Variant(
        label=label, path=f"{label}.onnx", int8="int8" in label, pruned="pruned" in label, params=size[0],
        mflops=size[1], accuracy=acc, accuracy_at_threshold=acc, latency_p50_ms=p50, latency_p95_ms=1.4 * p50,
        latency_p25_ms=p50 * (1 - spread), latency_p75_ms=p50 * (1 + spread),
        latency_round_p50_ms=rounds if rounds is not None else [p50] * 5, latency_runs=1000,
    )


def _choose_in_every_order(variants: list[Variant], bar: float = 0.01) -> set[str | None]:
    """The labels `choose_artefact` ships over every order of the list (one label: order does not matter)."""
    shipped = set()
    for order in itertools.permutations(variants):
        chosen = choose_artefact(list(order), bar)
        shipped.add(chosen.label if chosen else None)
    return shipped


def test_an_fp32_clearly_faster_than_its_int8_ships_the_fp32():
    # The hard-swish network of the README's bench: INT8 25 % slower, the IQRs apart, every round.
    fp32 = _variant("fp32", 0.107, acc=0.911)
    int8 = _variant("int8", 0.134, acc=0.913)
    assert clearly_faster(fp32, int8) and not clearly_faster(int8, fp32)
    assert _choose_in_every_order([fp32, int8]) == {"fp32"}


def test_an_int8_clearly_faster_ships_the_int8():
    # A network INT8 does speed up: FP32 is not preferred when the difference is real.
    assert _choose_in_every_order([_variant("fp32", 0.20), _variant("int8", 0.12)]) == {"int8"}
    pruned = [_variant("pruned fp32", 0.17, size=PRUNED25), _variant("pruned+int8", 0.10, size=PRUNED25)]
    assert _choose_in_every_order([_variant("fp32", 0.20), _variant("int8", 0.12), *pruned]) == {"pruned+int8"}


def test_a_variant_outside_the_accuracy_bar_never_ships_even_when_fastest():
    variants = [
        _variant("fp32", 0.107, acc=0.911),
        _variant("int8", 0.134, acc=0.913),
        _variant("pruned fp32", 0.060, acc=0.900, size=PRUNED50),  # 1.1 points under the float model
        _variant("pruned+int8", 0.090, acc=0.905, size=PRUNED50),
    ]
    assert clearly_faster(variants[2], variants[3])
    assert _choose_in_every_order(variants, bar=0.01) == {"pruned+int8"}
    assert _choose_in_every_order(variants, bar=0.02) == {"pruned fp32"}  # within a wider bar it ships
    assert choose_artefact(variants, 0.0).label == "fp32"  # only the float model's accuracy or better


def test_latencies_within_noise_are_decided_by_the_tie_break_in_any_order():
    # Pruned 7 % faster at p50, but the single runs' IQRs overlap: no real difference, so the
    # smaller model ships, whichever order the list is in.
    fp32, pruned = _variant("fp32", 0.107), _variant("pruned fp32", 0.100, size=PRUNED25)
    assert not clearly_faster(pruned, fp32) and not clearly_faster(fp32, pruned)
    assert _choose_in_every_order([fp32, pruned]) == {"pruned fp32"}
    # ... and it ships as well when it is the slower of the two by the same noise.
    assert _choose_in_every_order([_variant("fp32", 0.100), _variant("pruned fp32", 0.107, size=PRUNED25)]) == {
        "pruned fp32"}
    # INT8 3 % faster than the same model's FP32, IQRs tight and apart, every round: under the
    # margin, so the FP32 graph ships.
    fp32, int8 = _variant("fp32", 0.107, spread=0.005), _variant("int8", 0.104, spread=0.005)
    assert fp32.latency_p25_ms > int8.latency_p75_ms and not clearly_faster(int8, fp32)
    assert _choose_in_every_order([fp32, int8]) == {"fp32"}
    # Less compute comes before FP32: a pruned INT8 as fast as the FP32 within noise ships.
    fp32, pruned_int8 = _variant("fp32", 0.107), _variant("pruned+int8", 0.110, size=PRUNED25)
    assert _choose_in_every_order([fp32, pruned_int8]) == {"pruned+int8"}


def test_a_difference_that_one_round_contradicts_is_noise():
    # INT8 20 % faster pooled and the IQRs apart, but one round (a slow spell that hit it) says
    # otherwise: not clearly faster, the tie-break ships FP32.
    fp32 = _variant("fp32", 0.20, spread=0.05, rounds=[0.20, 0.20, 0.20, 0.20, 0.20])
    int8 = _variant("int8", 0.16, spread=0.05, rounds=[0.16, 0.16, 0.16, 0.21, 0.16])
    assert not clearly_faster(int8, fp32)
    assert choose_artefact([fp32, int8], 0.01).label == "fp32"
    int8.latency_round_p50_ms[3] = 0.17
    assert choose_artefact([fp32, int8], 0.01).label == "int8"


def test_a_difference_within_the_spread_of_single_runs_is_noise():
    # 10 % apart at p50 (beyond the margin, in every round) but each IQR wider than the gap.
    fp32, int8 = _variant("fp32", 0.20, spread=0.08), _variant("int8", 0.18, spread=0.08)
    assert fp32.latency_p25_ms < int8.latency_p75_ms and not clearly_faster(int8, fp32)
    assert _choose_in_every_order([fp32, int8]) == {"fp32"}


def test_nothing_ships_when_nothing_meets_the_bar():
    variants = [_variant("fp32", 0.107, acc=0.91), _variant("int8", 0.134, acc=0.905)]
    # A negative bar asks for beating the float model; nobody does.
    assert choose_artefact(variants, -0.01) is None
    # A NaN accuracy (nothing measured) meets no bar.
    unmeasured = [_variant("fp32", 0.107, acc=math.nan), _variant("int8", 0.134, acc=math.nan)]
    assert choose_artefact(unmeasured, 0.5) is None


def test_without_an_fp32_reference_or_with_a_bad_margin_it_says_so():
    with pytest.raises(SaofuError, match="fp32"):
        choose_artefact([_variant("int8", 0.1)], 0.01)
    with pytest.raises(SaofuError, match="min_gain"):
        choose_artefact([_variant("fp32", 0.1)], 0.01, min_gain=1.0)


class _FakeSession:
    def __init__(self, name: str, log: list[str]):
        self.name, self.log = name, log

    def run(self, outputs, feed):
        self.log.append(self.name)


def test_graphs_are_timed_turn_about_with_the_order_rotating(monkeypatch):
    log: list[str] = []
    monkeypatch.setattr(evaluation, "session", lambda path, threads=1: _FakeSession(str(path), log))
    stats = measure_latency_interleaved(["a", "b", "c"], image_size=8, rounds=3, runs=2, warmup=1)
    assert log[:3] == ["a", "b", "c"]  # warm-up, once each
    assert "".join(log[3:]) == "aabbcc" + "bbccaa" + "ccaabb"
    assert [s.runs for s in stats] == [6, 6, 6] and all(len(s.round_p50_ms) == 3 for s in stats)
    with pytest.raises(SaofuError, match="round"):
        measure_latency_interleaved(["a"], rounds=0)


@pytest.fixture(scope="module")
def tiny_variants(tmp_path_factory):
    """An untrained saofu_fu_tiny exported as FP32 and INT8, and a small random 'fresh slice'."""
    torch.manual_seed(0)
    classes, size = ["a", "b", "c"], 32
    model = create_model("saofu_fu_tiny", len(classes))
    folder = tmp_path_factory.mktemp("steps")
    rng = np.random.default_rng(0)
    fp32 = export_onnx(model, classes, folder / "model.fp32.onnx", image_size=size)
    int8 = quantize_int8(fp32, rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8), folder / "model.int8.onnx",
                         n_calibration=16)
    params, mflops = count_params(model), count_flops(model, size) / 1e6
    variants = [Variant("fp32", str(fp32), False, False, params, mflops),
                Variant("int8", str(int8), True, False, params, mflops)]
    fresh = TensorSplit(torch.from_numpy(rng.integers(0, 256, (24, 3, size, size), dtype=np.uint8)),
                        torch.from_numpy(rng.integers(0, 3, 24)), classes, [f"{i}.png" for i in range(24)])
    return variants, fresh


def _expected_stats(ms: np.ndarray, rounds: int) -> dict:
    """What the statistics of one graph's timed runs (in run order) must be, computed here."""
    p25, p50, p75, p95 = np.percentile(ms, [25, 50, 75, 95])
    return {"p25_ms": p25, "p50_ms": p50, "p75_ms": p75, "p95_ms": p95, "mean_ms": ms.mean(),
            "round_p50_ms": [np.median(r) for r in np.split(ms, rounds)], "runs": len(ms)}


def _assert_stats(got, expected: dict) -> None:
    for key, value in expected.items():
        assert getattr(got, key) == pytest.approx(value), key


def test_interleaved_measurement_of_real_graphs_gives_the_statistics_of_each_graphs_runs(tiny_variants,
                                                                                         monkeypatch):
    variants, fresh = tiny_variants
    # The real graphs run; each timed run lasts the next made-up duration of the graph that ran.
    ms = {v.path: durations(120, low, low + 1.0, seed=i) for i, (v, low) in enumerate(zip(variants, (1.0, 0.5)))}
    clock = FakeClock(ms).install(monkeypatch)
    stats = measure_latency_interleaved([v.path for v in variants], image_size=32, rounds=3, runs=40, warmup=5)
    clock.assert_all_taken()  # 3 rounds x 40 timed runs of each graph, warm-up untimed
    assert len(stats) == 2
    for s, v in zip(stats, variants):  # in the order given, each with its own graph's runs
        _assert_stats(s, _expected_stats(ms[v.path], rounds=3))


def test_measure_variants_fills_accuracy_and_latency_and_the_measured_fastest_ships(tiny_variants, monkeypatch):
    variants, fresh = tiny_variants
    # INT8's runs take about half FP32's, whatever the machine does.
    ms = {v.path: durations(60, low, low + 0.1, seed=i) for i, (v, low) in enumerate(zip(variants, (1.0, 0.5)))}
    clock = FakeClock(ms).install(monkeypatch)
    measured = measure_variants(variants, fresh, 0.9, None, rounds=2, runs=30, warmup=5)
    clock.assert_all_taken()
    assert measured is variants
    for v in variants:
        assert 0 <= v.accuracy_at_threshold <= v.accuracy <= 1 and v.size_bytes == Path(v.path).stat().st_size
        expected = _expected_stats(ms[v.path], rounds=2)
        for key in ("p25_ms", "p50_ms", "p75_ms", "p95_ms", "round_p50_ms"):
            assert getattr(v, f"latency_{key}") == pytest.approx(expected[key]), key
        assert v.latency_runs == 60
    assert choose_artefact(variants, 1.0).label == "int8"  # a bar of 1: both eligible, the faster ships
