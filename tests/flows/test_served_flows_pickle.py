"""Every deployed flow validates its parameters the way the executor runs it.

The executor (`python -m flows.deployments`, Prefect's Runner with `add_flow`) runs each flow
run in a spawned process, the flow object cloudpickled *by value* (the module attribute is the
Flow, not its function). A function pickled by value keeps only the globals its code uses: a
parameter annotation left as a string (`from __future__ import annotations`) then names a
class the function's new globals lack, and every run of that deployment failed with
"`Fast_Retrain_FlowModel` is not fully defined" before doing anything. The flow modules
therefore evaluate their annotations; this test reproduces the executor's round trip.
"""

from __future__ import annotations

import multiprocessing

import cloudpickle
import pytest

from flows.deployments import deployment_specs


def _validate_each(payloads: dict[str, tuple[bytes, dict]]) -> dict[str, str]:
    """In a fresh spawned process: unpickle each flow, validate its deployment's parameters."""
    outcome = {}
    for name, (payload, parameters) in payloads.items():
        flow = cloudpickle.loads(payload)
        try:
            validated = flow.validate_parameters(parameters)
            outcome[name] = f"ok: {type(validated.get('params')).__name__}"
        except Exception as exc:  # the failure is the finding: report it, per flow
            outcome[name] = f"{type(exc).__name__}: {exc}"
    return outcome


@pytest.mark.timeout(300)
def test_each_deployed_flow_validates_its_form_after_the_executors_pickle_round_trip(saofu_home):
    payloads = {}
    expected = {}
    for f, kw in deployment_specs():
        parameters = kw.get("parameters") or {}
        payloads[kw["name"]] = (cloudpickle.dumps(f), parameters)
        expected[kw["name"]] = type(f.validate_parameters(parameters).get("params")).__name__
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        outcome = pool.apply(_validate_each, (payloads,))
    assert outcome == {name: f"ok: {cls}" for name, cls in expected.items()}, outcome
    # the forms that carry a parameter model really produced one (not a dict passed through)
    assert expected["fast-retrain"] == "FastRetrainParams" and expected["cycle"] == "CycleParams"
