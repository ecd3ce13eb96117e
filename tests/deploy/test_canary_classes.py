"""The canary after a class change: a challenger that knows `fu_merchant` against a champion that does not.

The models are tiny hand-made ONNX graphs (`colour_model`: logits = mean colour @ W), so which
class each one answers for an image is known without training: red is `fu` for both, green
`not_fu`, and blue a merchant's 福, which the champion calls `fu` and the challenger `fu_merchant`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy.app import ServeConfig
from deploy.canary import ArmStats, Canary, CanaryPolicy, CanaryRun, compare_answers, verdict
from deploy.model_source import LoadedModel, ModelSet, load_model, parse_refines
from saofu.errors import SaofuError

SIZE = 8
RED, GREEN, BLUE, YELLOW = (250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)
TWO = ["fu", "not_fu"]
THREE = ["fu", "fu_merchant", "not_fu"]
# Columns: the classes; rows: the mean R, G, B. The champion's `fu` answers red and blue alike.
CHAMPION_W = [[0.1, 0], [0, 0.1], [0.1, 0]]
CHALLENGER_W = [[0.1, 0, 0], [0, 0, 0.1], [0, 0.1, 0]]
MERCHANT = {"fu_merchant": "fu"}


def colour_model(path: str | Path, classes: list[str], weights, refines: dict[str, str] | None = None,
                 size: int = SIZE, extra_meta: dict[str, str] | None = None) -> Path:
    """An ONNX graph with export_onnx's interface (uint8 NHWC `pixels` -> `logits`; classes, image
    size and optionally `refines` in the metadata) computing logits = mean RGB @ `weights` [3, C]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.asarray(weights, np.float32)
    nodes = [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["rgb"], axes=[1, 2], keepdims=0),
             helper.make_node("MatMul", ["rgb", "W"], ["logits"])]
    graph = helper.make_graph(
        nodes, "colour", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weights.shape[1]])],
        [numpy_helper.from_array(weights, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    meta = {"classes": json.dumps(classes), "image_size": str(size), "arch": f"colour{len(classes)}"}
    if refines is not None:
        meta["refines"] = json.dumps(refines)
    helper.set_model_props(model, {**meta, **(extra_meta or {})})
    onnx.save(model, str(path))
    return Path(path)


def png(colour: tuple[int, int, int], size: int = SIZE) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


def stub(classes: list[str], refines: dict[str, str] | None = None, version: str = "1") -> LoadedModel:
    """A LoadedModel for the rules alone (no session is run)."""
    return LoadedModel("fu", version, None, tuple(classes), SIZE, "pixels", "logits", "", refines or {})


# ------------------------------------------------------------------------------------- the rule


def test_a_new_class_refining_the_champions_answer_is_agreement():
    champion, challenger = stub(TWO), stub(THREE, MERCHANT, "2")
    assert compare_answers("fu_merchant", "fu", challenger, champion) is True
    assert compare_answers("fu_merchant", "not_fu", challenger, champion) is False  # a 福 or not: they differ
    assert compare_answers("fu", "fu", challenger, champion) is True
    assert compare_answers("not_fu", "fu", challenger, champion) is False
    # The refinement may come from either graph's metadata, and chains reach a class the champion knows.
    assert compare_answers("fu_merchant", "fu", stub(THREE, version="2"), stub(TWO, MERCHANT)) is True
    gold = stub(["fu", "fu_merchant_gold", "not_fu"], {"fu_merchant_gold": "fu_merchant", "fu_merchant": "fu"})
    assert compare_answers("fu_merchant_gold", "fu", gold, champion) is True


def test_an_answer_the_other_model_cannot_give_is_not_compared():
    champion, challenger = stub(TWO), stub(THREE, version="2")  # no refinement known
    assert compare_answers("fu_merchant", "fu", challenger, champion) is None
    assert compare_answers("fu_merchant", "not_fu", challenger, champion) is None
    assert compare_answers("fu", "not_fu", challenger, champion) is False  # shared classes: as before
    # Both know fu_merchant: choosing fu instead is a real disagreement, refinement or not.
    assert compare_answers("fu_merchant", "fu", stub(THREE, MERCHANT, "2"), stub(THREE, MERCHANT)) is False
    # The other way round (a champion with the class, a challenger without) is symmetric.
    assert compare_answers("fu", "fu_merchant", stub(TWO, version="2"), stub(THREE, MERCHANT)) is True
    assert compare_answers("fu", "fu_merchant", stub(TWO, version="2"), stub(THREE)) is None


def test_not_compared_answers_stay_out_of_the_agreement_and_do_not_roll_back():
    policy = CanaryPolicy(min_requests=10, check_every=10)
    canary = Canary(policy, seed=0)
    canary.update(ModelSet(stub(TWO), stub(THREE, version="2")))
    run = canary.route(ModelSet(stub(TWO), stub(THREE, version="2"))) or canary._run
    # 30 % of canary answers are the new class (not comparable), the rest agree but one.
    for i in range(100):
        agreed = None if i % 10 < 3 else i != 99
        canary.record_challenger(run, 0.001, True, False, shadow_confident=True, agreed=agreed,
                                 shadow_seconds=0.001)
    assert run.status == "running", run.reason
    assert (run.not_compared, run.compared, run.agreed) == (30, 70, 69)
    assert run.agreement == pytest.approx(69 / 70)
    snapshot = canary.snapshot()
    assert snapshot["not_compared"] == 30 and snapshot["compared"] == 70
    # Counted as disagreements those 30 would have stopped it.
    as_before = CanaryRun("1", "2", 0.0, run.champion, run.challenger, run.shadow_confident, agreed=69)
    assert verdict(as_before, policy)[1] == ("agreement",)
    # A run with nothing comparable yet is not judged on agreement.
    blind = CanaryRun("1", "2", 0.0, ArmStats(requests=50), ArmStats(requests=50, confident=50), 50, 0,
                      not_compared=50)
    assert verdict(blind, CanaryPolicy(min_requests=10)) == ("", ())


# ------------------------------------------------------------------------- the app, end to end


@pytest.fixture
def graphs(tmp_path) -> dict[str, Path]:
    return {
        "champion": colour_model(tmp_path / "champion.onnx", TWO, CHAMPION_W),
        "challenger": colour_model(tmp_path / "challenger.onnx", THREE, CHALLENGER_W, refines=MERCHANT),
        "challenger-plain": colour_model(tmp_path / "plain.onnx", THREE, CHALLENGER_W),
    }


@pytest.mark.parametrize("refined", [True, False], ids=["refines", "no-refines"])
def test_a_three_class_challenger_is_not_rolled_back_for_its_new_class(graphs, refined):
    import httpx

    from tests.deploy.test_serving import StaticSource, running  # a real server (imports mlflow, torch)

    champion = load_model(graphs["champion"], "fu", "1")
    challenger = load_model(graphs["challenger" if refined else "challenger-plain"], "fu", "2")
    assert challenger.refines == (MERCHANT if refined else {}) and champion.refines == {}
    policy = CanaryPolicy(share=1.0, min_requests=10, check_every=5, max_latency_ratio=100)
    config = ServeConfig(model_name="fu", canary=policy)
    # A merchant campaign: 40 % of the scans are a merchant's 福.
    colours = [RED, BLUE, GREEN, BLUE, RED] * 8
    with running(config, StaticSource(ModelSet(champion, challenger))) as url, httpx.Client(base_url=url) as client:
        answers = [client.post("/predict", content=png(c), headers={"content-type": "image/png"}) for c in colours]
        canary = client.get("/healthz").json()["canary"]
        metrics = client.get("/metrics").text
    assert [r.status_code for r in answers] == [200] * len(colours)
    assert {r.json()["arm"] for r in answers} == {"challenger"}
    assert [r.json()["top_class"] for r in answers[:3]] == ["fu", "fu_merchant", "not_fu"]
    assert canary["status"] == "running", canary["reason"]
    assert canary["agreement"] == 1.0
    assert canary["not_compared"] == (0 if refined else 16)
    assert canary["compared"] == (40 if refined else 24)
    assert f"saofu_canary_not_compared {0.0 if refined else 16.0}" in metrics


def test_a_challenger_whose_new_class_swallows_the_champions_not_fu_is_rolled_back(tmp_path):
    import httpx

    from tests.deploy.test_serving import StaticSource, running

    # Yellow is `not_fu` for the champion; this challenger calls it its merchant's 福: refining
    # `fu` does not make that agreement.
    champion = load_model(colour_model(tmp_path / "c.onnx", TWO, [[0.1, 0], [0, 0.2], [0.1, 0]]), "fu", "1")
    weights = [[0.2, 0.1, 0], [0, 0.15, 0.2], [0, 0, 0]]
    challenger = load_model(colour_model(tmp_path / "y.onnx", THREE, weights, refines=MERCHANT), "fu", "3")
    policy = CanaryPolicy(share=1.0, min_requests=10, check_every=5, max_latency_ratio=100)
    config = ServeConfig(model_name="fu", canary=policy)
    with running(config, StaticSource(ModelSet(champion, challenger))) as url, httpx.Client(base_url=url) as client:
        answers = [client.post("/predict", content=png(colour), headers={"content-type": "image/png"})
                   for colour in [YELLOW, RED, YELLOW, GREEN] * 5]
        canary = client.get("/healthz").json()["canary"]
    assert [r.status_code for r in answers] == [200] * 20
    assert [r.json()["top_class"] for r in answers[:4]] == ["fu_merchant", "fu", "fu_merchant", "not_fu"]
    assert canary["status"] == "rolled_back" and "agrees with the champion on 50.0%" in canary["reason"]
    assert canary["not_compared"] == 0


# ------------------------------------------------------------------------------- the metadata


def test_refines_metadata_is_optional_and_a_malformed_one_is_refused(tmp_path):
    assert parse_refines(None, "x") == {} and parse_refines("", "x") == {}
    assert parse_refines('{"fu_merchant": "fu"}', "x") == MERCHANT
    for bad in ('["fu"]', '{"fu": "fu"}', '{"a": 1}', "not json"):
        with pytest.raises(SaofuError, match="`refines` metadata"):
            parse_refines(bad, "fu version 9")
    broken = colour_model(tmp_path / "b.onnx", THREE, CHALLENGER_W, extra_meta={"refines": "{oops"})
    with pytest.raises(SaofuError, match="fu version 9 .*`refines` metadata"):
        load_model(broken, "fu", "9")


def test_a_class_list_that_does_not_match_the_logits_is_refused_at_load(tmp_path):
    # 3 logits but 2 names: every answer would be named wrong; the version is refused, not served.
    wrong = colour_model(tmp_path / "w.onnx", TWO, CHALLENGER_W)
    with pytest.raises(SaofuError, match="outputs 3 logits but its metadata lists 2 classes"):
        load_model(wrong, "fu", "4")
