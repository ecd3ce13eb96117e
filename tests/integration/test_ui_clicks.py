"""One click, tested as a person does it: the real Prefect and MLflow UIs in headless Chromium.

The project is set up with the README's commands (`saofu train`, `saofu release`, `saofu up ...
--model shapes`) as subprocesses of the installed `saofu`, from the project folder, with no
saofu/MLflow/Prefect variable set. Then:

1. Prefect UI: Deployments → fast-retrain → Run → Custom run, the new class typed into the form,
   Submit; the run, executed by `saofu up`'s executor, completes; its summary is on its page
   (Artifacts tab, then the summary's card); the serving app answers with the version it shipped.
2. MLflow UI: the new version's page shows its lineage tags; the `champion` alias is added to the
   previous champion by hand (the UI's alias editor moves it). The serving app follows, and
   `saofu history` records the move as `manual`.

Playwright drives Debian's chromium (the `chromium` fixture; it downloads no browser). Screenshots land
in `test-artefacts/browser/` at the repository root (kept after the run, ignored by git).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import SHAPES, make_shapes_dataset
from tests.integration.conftest import free_port
from tests.integration.user_shell import user_env as _user_env

# Playwright drives Debian's chromium (the `chromium` fixture: executable_path) and downloads no browser.

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SAOFU = str(Path(sys.executable).with_name("saofu"))
ARTEFACTS = REPO / "test-artefacts" / "browser"
MODEL = "shapes"


def saofu(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([SAOFU, *args], cwd=project, env=_user_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"saofu {' '.join(args)} exited {done.returncode}:\n{done.stdout[-2000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    return done


def get_json(url: str, timeout: float = 10) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def post_png(url: str, path: Path) -> dict:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "PNG")
    req = urllib.request.Request(f"{url}/predict", data=buf.getvalue(), headers={"content-type": "image/png"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def run_ids(prefect: str, deployment_id: str) -> list[str]:
    body = json.dumps({"deployments": {"id": {"any_": [deployment_id]}}}).encode()
    req = urllib.request.Request(f"{prefect}/api/flow_runs/filter", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return [run["id"] for run in json.loads(resp.read())]


def champion_of(project: Path) -> str:
    history = json.loads(saofu(project, "history", MODEL, "--json", timeout=120).stdout)["history"]
    return history[-1]["version"] if history else ""


def wait_for(what: str, check, timeout: float, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A project with a champion (circle, square) serving, triangle labels in a folder, and
    `saofu up prefect executor mlflow serving --model shapes` running; stopped at the end."""
    project = tmp_path_factory.mktemp("ui") / "project"
    data = make_shapes_dataset(project / "data" / "shapes", n_per_class=60, size=32)
    labels = project / "campaign"
    labels.mkdir()
    (data / "triangle").rename(labels / "triangle")  # the class the click adds
    saofu(project, "train", "--data", "data/shapes", "--registered-model", MODEL, "--epochs", "8",
          "--image-size", "32")
    saofu(project, "release", "--model", MODEL, "--max-latency-ms", "50")
    first = champion_of(project)
    assert first, "the first release promoted nothing"
    ports = {"prefect": free_port(), "mlflow": free_port(), "serving": free_port()}
    try:
        up = saofu(project, "up", "prefect", "executor", "mlflow", "serving", "--model", MODEL, "--json",
                   "--prefect-port", str(ports["prefect"]), "--mlflow-port", str(ports["mlflow"]),
                   "--serving-port", str(ports["serving"]), timeout=900)
        urls = {name: info["url"] for name, info in json.loads(up.stdout)["services"].items()}
        yield {"project": project, "labels": labels, "urls": urls, "first_champion": first, "data": data}
    finally:
        for name in ("executor", "prefect"):
            log = project / ".saofu" / f"{name}.log"
            if log.exists():
                ARTEFACTS.mkdir(parents=True, exist_ok=True)
                shutil.copy(log, ARTEFACTS / f"{name}.log")
        subprocess.run([SAOFU, "down"], cwd=project, env=_user_env(), capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(60_000)
    yield context.new_page()
    context.close()


def form_field(page, label: str):
    """The input of the Prefect form property labelled `label` (its title, "Name (Optional)" etc.)."""
    prop = page.locator(f"xpath=//span[contains(@class,'schema-form-property__label')][normalize-space()='{label}']"
                        "/ancestor::*[contains(concat(' ', normalize-space(@class), ' '), ' p-label ')][1]")
    prop.first.wait_for()  # the form renders after the deployment's schema arrives
    assert prop.count() == 1, f"the run form has {prop.count()} fields labelled {label!r}"
    return prop.locator(".p-base-input__control").first


SHIPPED: dict[str, str] = {}  # what the click shipped, for the MLflow check


@pytest.mark.timeout(2400)
def test_custom_run_of_fast_retrain_clicked_in_the_prefect_ui_is_served(stack, page):
    prefect, serving = stack["urls"]["prefect"], stack["urls"]["serving"]
    assert get_json(f"{serving}/healthz")[1]["versions"]["champion"] == stack["first_champion"]

    page.goto(f"{prefect}/deployments")
    page.get_by_role("link", name="fast-retrain").first.click()
    page.wait_for_url(re.compile(r".*/deployments/deployment/[0-9a-f-]{36}.*"))
    deployment_id = re.search(r"/deployment/([0-9a-f-]{36})", page.url).group(1)
    runs_before = set(run_ids(prefect, deployment_id))
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.wait_for_url(re.compile(r".*/deployments/deployment/[^/]+/run.*"))
    # The form starts from the deployment's parameters: `saofu up --model shapes` reached them.
    assert form_field(page, "Registered Model (Optional)").input_value() == MODEL
    form_field(page, "Name (Optional)").fill("triangle")
    form_field(page, "Refines (Optional)").fill("")
    form_field(page, "Labels (Optional)").fill(str(stack["labels"]))
    form_field(page, "Budget Min (Optional)").fill("0.25")
    # Eight epochs on 60 shapes make no 95 % model: the gate's targets opened, the path is what is checked.
    form_field(page, "New Class Recall (Optional)").fill("0")
    form_field(page, "Max Old Class Drop Pts (Optional)").fill("100")
    form_field(page, "Max Latency Ms (Optional)").fill("50")
    form_field(page, "Serve Url (Optional)").fill(serving)
    page.screenshot(path=str(ARTEFACTS / "prefect-custom-run-form.png"), full_page=True)
    page.get_by_role("button", name="Submit", exact=True).click()

    # Back on the deployment's page, the new run is listed: open it as a person would.
    page.wait_for_url(re.compile(r".*/deployments/deployment/[0-9a-f-]{36}(\?.*)?$"))
    run_id = wait_for("the submitted run", lambda: next(
        (r for r in run_ids(prefect, deployment_id) if r not in runs_before), None), timeout=60)
    page.locator(f"a[href$='/runs/flow-run/{run_id}']").first.click()
    page.wait_for_url(re.compile(rf".*/runs/flow-run/{run_id}.*"))
    _, submitted = get_json(f"{prefect}/api/flow_runs/{run_id}")
    change = submitted["parameters"]["params"]["changes"][0]
    assert change["name"] == "triangle" and not change.get("refines"), submitted["parameters"]

    def finished():
        state = get_json(f"{prefect}/api/flow_runs/{run_id}")[1].get("state") or {}
        return state if state.get("type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    state = wait_for("the fast-retrain run to finish", finished, timeout=1500, every=5)
    page.reload()
    if state["type"] == "COMPLETED":
        page.get_by_text("Completed").first.wait_for()
    page.screenshot(path=str(ARTEFACTS / "prefect-finished-run.png"), full_page=True)
    log_tail = (stack["project"] / ".saofu" / "executor.log").read_text(errors="replace")[-4000:]
    assert state["type"] == "COMPLETED", f"the run ended {state['type']}: {state.get('message')}\n{log_tail}"

    # The run shipped a new champion, and the serving app answers with it (the run waited for that).
    shipped = champion_of(stack["project"])
    assert shipped and shipped != stack["first_champion"], shipped
    health = get_json(f"{serving}/healthz")[1]
    assert health["versions"]["champion"] == shipped, health
    answer = post_png(serving, next((stack["labels"] / "triangle").glob("*.png")))
    assert answer["version"] == shipped and answer["top_class"] in SHAPES, answer

    # Its summary is a click away on the run's page: the Artifacts tab, then the summary's card.
    page.get_by_text("Artifacts", exact=True).first.click()
    page.locator("a[href*='/artifacts/artifact/']").first.click()
    page.wait_for_url(re.compile(r".*/artifacts/artifact/[0-9a-f-]{36}.*"))
    # (the model's name is set as code: the heading's accessible name spaces it)
    heading = re.compile(rf"Fast retrain of\s*{MODEL}\s*: promoted: version {shipped} is the champion")
    page.get_by_role("heading", name=heading).wait_for()
    page.get_by_text("release/compress").first.wait_for()
    page.screenshot(path=str(ARTEFACTS / "prefect-run-summary.png"), full_page=True)
    SHIPPED.update(version=shipped, previous=stack["first_champion"])


@pytest.mark.timeout(600)
def test_champion_moved_back_by_hand_in_the_mlflow_ui_is_followed_and_recorded(stack, page):
    if not SHIPPED:
        pytest.fail("needs the version the Prefect UI click shipped (the previous test)")
    mlflow, serving = stack["urls"]["mlflow"], stack["urls"]["serving"]
    new, previous = SHIPPED["version"], SHIPPED["previous"]

    # The new version, with its lineage, as a person finds it. (MLflow's page scrolls inside a panel:
    # a tall window puts every tag in the screenshots.)
    page.set_viewport_size({"width": 1400, "height": 2800})
    page.goto(f"{mlflow}/#/models/{MODEL}")
    page.get_by_role("link", name=f"Version {new}", exact=True).click()
    page.wait_for_url(re.compile(rf".*/models/{MODEL}/versions/{new}$"))
    for tag in ("parent_version", "saofu.change", "data_version", "prefect_flow_run_id"):
        page.get_by_text(tag, exact=True).first.wait_for()
    assert "triangle" in page.locator("body").inner_text()
    page.screenshot(path=str(ARTEFACTS / "mlflow-new-version.png"), full_page=True)

    # Move `champion` back to the previous version by hand: its page, Aliases → Add, save.
    page.goto(f"{mlflow}/#/models/{MODEL}/versions/{previous}")
    page.get_by_role("button", name="Add", exact=True).first.click()
    dialog = page.get_by_role("dialog")
    dialog.locator("input").first.fill("champion")
    page.keyboard.press("Enter")
    dialog.get_by_text(f"also being used on version {new}").wait_for()
    page.screenshot(path=str(ARTEFACTS / "mlflow-move-alias.png"))
    dialog.get_by_role("button", name="Save aliases").click()
    dialog.wait_for(state="hidden")

    # The serving app follows the alias (its poll), and the history calls the move manual.
    wait_for(f"the serving app to serve v{previous} again",
             lambda: get_json(f"{serving}/healthz")[1]["versions"]["champion"] == previous, timeout=120)
    history = json.loads(saofu(stack["project"], "history", MODEL, "--json", timeout=120).stdout)["history"]
    last = history[-1]
    assert last["action"] == "manual" and last["version"] == previous and last["previous"] == new, history
    page.reload()
    page.get_by_text("parent_version", exact=True).first.wait_for()
    page.screenshot(path=str(ARTEFACTS / "mlflow-champion-moved-back.png"), full_page=True)
