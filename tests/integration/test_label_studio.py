"""Label Studio end to end: a real server, the SDK, the simulated labeler and a real browser."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
from itertools import count
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from saofu.errors import SaofuError
from tasks.labeling.client import (
    LabelingItem,
    PredictionSpec,
    completed_annotations,
    ensure_project,
    import_tasks,
    latest_update,
    list_tasks,
    project_classes,
)
from tasks.labeling.simulated_labeler import simulate_labeling

pytestmark = pytest.mark.integration

CLASSES = ["fu", "not_fu"]
COLOURS = {"fu": (200, 20, 30), "not_fu": (30, 60, 200)}
_titles = count()


def _title(prefix: str) -> str:
    """A fresh project per test, so tests never see each other's tasks."""
    return f"{prefix}-{next(_titles)}"


@pytest.fixture(scope="session")
def images(label_studio) -> list[tuple[Path, str]]:
    """Eight images (four per class) under the server's files root, with their true class."""
    out = []
    for cls in CLASSES:
        folder = label_studio.files_root / "images" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(4):
            im = Image.new("RGB", (256, 256), (245, 235, 200))
            d = ImageDraw.Draw(im)
            d.rectangle([40 + 4 * i, 40, 216, 216], fill=COLOURS[cls])
            d.ellipse([96, 96, 160, 160], fill=(250, 210, 40))
            path = folder / f"{cls}_{i}.png"
            im.save(path)
            out.append((path, cls))
    return out


def _items(images, with_predictions: bool = False) -> list[LabelingItem]:
    items = []
    for path, cls in images:
        preds = [PredictionSpec("champion-v3", cls, 0.91), PredictionSpec("second-v1", cls, 0.62)]
        items.append(LabelingItem(image=path, source="online_pool", predictions=preds if with_predictions else []))
    return items


def _truth(task: dict) -> str:
    return Path(task["data"]["path"]).parent.name  # images/<class>/<file>


def _labelled_project(client, label_studio, images, prefix: str) -> int:
    pid = ensure_project(client, _title(prefix), CLASSES)
    import_tasks(client, pid, _items(images), files_root=label_studio.files_root)
    return pid


def test_project_found_again_and_class_mismatch(client):
    title = _title("find-again")
    pid = ensure_project(client, title, CLASSES)
    assert ensure_project(client, title, list(reversed(CLASSES))) == pid  # order does not matter
    with pytest.raises(SaofuError, match=r"missing \['fu_merchant'\]"):
        ensure_project(client, title, [*CLASSES, "fu_merchant"], allow_growth=False)
    assert project_classes(client.projects.get(id=pid).label_config) == CLASSES


@pytest.mark.timeout(300)  # includes starting Label Studio when this test runs first
def test_project_grows_a_class_and_keeps_its_annotations(client, label_studio, images):
    title = _title("grow")
    pid = ensure_project(client, title, CLASSES)
    (task_id,) = import_tasks(client, pid, _items(images[:1]), files_root=label_studio.files_root)
    simulate_labeling(client, pid, _truth, annotators=("sim-1",))
    (before,) = completed_annotations(client, pid)
    assert before["task_id"] == task_id and [a["label"] for a in before["annotations"]] == ["fu"]

    # a retrain added `fu_merchant`: the project must collect labels for it too
    assert ensure_project(client, title, [*CLASSES, "fu_merchant"]) == pid
    assert project_classes(client.projects.get(id=pid).label_config) == ["fu", "not_fu", "fu_merchant"]
    assert [t["id"] for t in list_tasks(client, pid)] == [task_id]
    assert completed_annotations(client, pid) == [before]
    assert ensure_project(client, title, ["fu_merchant", "not_fu", "fu"]) == pid  # grown once, now the same
    # the new class is collectable: a second labeler picks it on the same task
    assert simulate_labeling(client, pid, lambda task: "fu_merchant", annotators=("sim-2",))["correct"] == 1
    (after,) = completed_annotations(client, pid)
    assert [a["label"] for a in after["annotations"]] == ["fu", "fu_merchant"]

    # dropping `not_fu` would orphan labels: refused, config untouched
    with pytest.raises(SaofuError, match=r"would remove \['not_fu'\].*with annotations is refused"):
        ensure_project(client, title, ["fu", "fu_merchant"])
    assert project_classes(client.projects.get(id=pid).label_config) == ["fu", "not_fu", "fu_merchant"]


def test_import_tasks_with_predictions(client, label_studio, images):
    pid = ensure_project(client, _title("import"), CLASSES)
    items = _items(images[:2], with_predictions=True)
    items[0].badcase = True
    ids = import_tasks(client, pid, items, files_root=label_studio.files_root)
    assert len(ids) == 2
    task = client.tasks.get(id=str(ids[0])).model_dump(mode="json")
    assert task["data"]["image"] == "/data/local-files/?d=images/fu/fu_0.png"
    assert task["data"]["badcase"] is True and len(task["data"]["sha256"]) == 64
    preds = {p["model_version"]: p for p in task["predictions"]}
    assert set(preds) == {"champion-v3", "second-v1"}
    assert preds["champion-v3"]["score"] == pytest.approx(0.91)
    assert preds["champion-v3"]["result"][0]["value"] == {"choices": ["fu"]}
    # the champion's predictions are the ones Label Studio pre-fills for labelers
    assert client.projects.get(id=pid).model_version == "champion-v3"


def test_simulated_labels_equal_truth_without_errors(client, label_studio, images):
    pid = _labelled_project(client, label_studio, images, "sim-exact")
    summary = simulate_labeling(client, pid, _truth, error_rate=0.0, annotators=("sim-1", "sim-2"))
    assert summary["tasks"] == len(images) and summary["correct"] == 2 * len(images)
    records = completed_annotations(client, pid)
    assert len(records) == len(images)
    for rec in records:
        assert {a["annotator"] for a in rec["annotations"]} == {"sim-1", "sim-2"}
        assert [a["label"] for a in rec["annotations"]] == [Path(rec["image"]).parent.name] * 2
    # nothing is left open: a second run answers nothing
    assert simulate_labeling(client, pid, _truth, annotators=("sim-1", "sim-2"))["annotations"] == 0


def test_error_rate_one_gives_the_other_class(client, label_studio, images):
    pid = _labelled_project(client, label_studio, images, "sim-wrong")
    summary = simulate_labeling(client, pid, _truth, error_rate=1.0, seed=3)
    assert summary["wrong"] == len(images)
    for rec in completed_annotations(client, pid):
        (ann,) = rec["annotations"]
        assert ann["label"] != Path(rec["image"]).parent.name and ann["label"] in CLASSES


def test_skips_are_cancelled_annotations(client, label_studio, images):
    pid = _labelled_project(client, label_studio, images, "sim-skip")
    assert simulate_labeling(client, pid, _truth, skip_rate=1.0)["skipped"] == len(images)
    for rec in completed_annotations(client, pid):
        (ann,) = rec["annotations"]
        assert ann["was_cancelled"] is True and ann["label"] is None


def test_completed_annotations_since_is_incremental(client, label_studio, images):
    pid = _labelled_project(client, label_studio, images, "incremental")
    simulate_labeling(client, pid, _truth, limit=3)
    first = completed_annotations(client, pid)
    assert len(first) == 3
    cursor = latest_update(first)
    assert completed_annotations(client, pid, since=cursor) == []
    simulate_labeling(client, pid, _truth)
    second = completed_annotations(client, pid, since=cursor)
    assert len(second) == len(images) - 3
    assert {r["task_id"] for r in first}.isdisjoint(r["task_id"] for r in second)
    assert completed_annotations(client, pid, since=latest_update(second)) == []


# ------------------------------------------------------------------------------------- browser


def _login(label_studio) -> requests.Session:
    """A browser-like session: Label Studio's login form (CSRF token from its cookie)."""
    s = requests.Session()
    login = f"{label_studio.url}/user/login/"
    s.get(login, timeout=30).raise_for_status()
    form = {"email": label_studio.username, "password": label_studio.password}
    s.post(login, data={**form, "csrfmiddlewaretoken": s.cookies["csrftoken"]}, headers={"Referer": login})
    assert "sessionid" in s.cookies, "login to Label Studio failed"
    return s


class DevTools:
    """The few Chrome DevTools Protocol calls the test needs, over one page's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect as ws_connect

        self.ws = ws_connect(ws_url, max_size=None, open_timeout=30)
        self.ids = count(1)
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        mid = next(self.ids)
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)  # e.g. Network.responseReceived, read after the page loaded

    def close(self) -> None:
        self.ws.close()


def _start_chromium(chromium: str, profile: Path) -> tuple[subprocess.Popen, str]:
    """Headless Chromium with remote debugging; returns the process and a page's websocket URL."""
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
        "--window-size=1280,900", "about:blank",
    ]  # fmt: skip
    proc = subprocess.Popen([chromium, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"  # Chromium writes its chosen port here
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("Chromium did not open its DevTools port")
        time.sleep(0.2)
    port = int(port_file.read_text().split()[0])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
        pages = [t for t in json.load(resp) if t["type"] == "page"]
    return proc, pages[0]["webSocketDebuggerUrl"]


_LOADED_IMAGES_JS = """
Array.from(document.images)
  .filter(i => i.src.includes('/data/local-files/'))
  .map(i => ({src: i.src, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))
"""

# What the labeling interface shows in the viewport: the boxes of the images and canvases big
# enough to be the image to label (the data manager's thumbnail is not), and the visible elements'
# own texts (each `<Choice>` renders as a checkbox labelled with its value).
_INTERFACE_JS = """
(() => {
  const shown = e => { const r = e.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && r.bottom > 0 && r.right > 0 && r.top < innerHeight && r.left < innerWidth; };
  const own = e => Array.from(e.childNodes).filter(n => n.nodeType === 3).map(n => n.textContent).join('').trim();
  return {
    images: Array.from(document.querySelectorAll('img, canvas')).filter(shown).map(e => {
      const r = e.getBoundingClientRect();
      return {tag: e.tagName, src: (e.src || '').slice(0, 80), x: r.x, y: r.y, width: r.width, height: r.height};
    }).filter(b => b.width >= 100 && b.height >= 100),
    texts: Array.from(document.querySelectorAll('body *')).filter(shown).map(own).filter(t => t),
    checkboxes: Array.from(document.querySelectorAll('input[type=checkbox], input[type=radio]')).filter(shown).length,
  };
})()
"""


def _pixels_near(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 24) -> np.ndarray:
    """Mask of the pixels within `tolerance` of `colour` in every channel."""
    return (np.abs(pixels.astype(np.int16) - np.array(colour, np.int16)).max(axis=-1) <= tolerance)


def assert_task_image_painted(shot: Path, image_boxes: list[dict], cls: str) -> None:
    """The screenshot is a painted page, and the task's image is painted where the interface put it.

    Not blank: many distinct colours and a spread of brightness. The image: its class colour
    (the rectangle, about half of it) and the yellow disc inside its on-screen box.
    """
    with Image.open(shot) as im:
        assert im.size == (1280, 900)
        pixels = np.asarray(im.convert("RGB"))
    distinct = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert distinct >= 64 and pixels.std() > 10, f"a blank screenshot: {distinct} colours, std {pixels.std():.1f}"
    assert image_boxes, "no image to label in the viewport"
    box = max(image_boxes, key=lambda b: b["width"] * b["height"])
    x0, y0 = max(0, int(box["x"])), max(0, int(box["y"]))
    x1, y1 = min(1280, int(box["x"] + box["width"])), min(900, int(box["y"] + box["height"]))
    inside = pixels[y0:y1, x0:x1]
    area = max(1, inside.shape[0] * inside.shape[1])
    # The 256-px image: a 176-px square of the class colour (47 % of it) with a 64-px disc on top.
    fill = _pixels_near(inside, COLOURS[cls]).sum() / area
    disc = _pixels_near(inside, (250, 210, 40)).sum() / area
    assert area >= 64 * 64 and fill > 0.2 and disc > 0.02, (box, f"{fill:.3f} class colour, {disc:.3f} disc")


def _screenshot_task(chromium, label_studio, session, url: str, out: Path) -> dict:
    """Open `url` logged in, wait until the task image has loaded, save a screenshot."""
    proc, ws_url = _start_chromium(chromium, out.parent / "chromium-profile")
    tools = DevTools(ws_url)
    try:
        tools.call("Network.enable")
        tools.call("Network.setCookie", name="sessionid", value=session.cookies["sessionid"], url=label_studio.url)
        tools.call("Page.enable")
        tools.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        tools.call("Page.navigate", url=url)
        loaded: list[dict] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not loaded:
            time.sleep(0.5)
            found = tools.call("Runtime.evaluate", expression=_LOADED_IMAGES_JS, returnByValue=True)
            loaded = [i for i in found["result"].get("value") or [] if i["complete"] and i["width"] > 0]
        time.sleep(1.5)  # let the labeling canvas paint the decoded image
        interface = tools.call("Runtime.evaluate", expression=_INTERFACE_JS, returnByValue=True)["result"]["value"]
        shot = tools.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))
        responses = [
            e["params"]["response"]
            for e in tools.events
            if e.get("method") == "Network.responseReceived" and "/data/local-files/" in e["params"]["response"]["url"]
        ]
        return {"images": loaded, "responses": responses, "interface": interface}
    finally:
        tools.close()
        proc.terminate()
        proc.wait(timeout=30)


def test_browser_shows_the_task_image(client, label_studio, images, chromium, tmp_path):
    pid = ensure_project(client, _title("browser"), CLASSES)
    path, cls = images[0]
    (task_id,) = import_tasks(client, pid, _items([(path, cls)], with_predictions=True), label_studio.files_root)
    task = next(t for t in list_tasks(client, pid) if t["id"] == task_id)
    session = _login(label_studio)
    # the labeler's session gets exactly the file's bytes from the task's image URL
    served = session.get(label_studio.url + task["data"]["image"], timeout=30)
    assert served.status_code == 200 and served.content == path.read_bytes()
    shot = tmp_path / "labeling-page.png"
    page = f"{label_studio.url}/projects/{pid}/data?task={task_id}"
    seen = _screenshot_task(chromium, label_studio, session, page, shot)
    assert any(r["status"] == 200 for r in seen["responses"]), seen
    assert seen["images"] and seen["images"][0]["width"] == 256, seen
    # The labeling interface is on screen: the image to label and one choice per class.
    interface = seen["interface"]
    assert set(CLASSES) <= set(interface["texts"]) and interface["checkboxes"] >= len(CLASSES), interface
    # And the browser painted it: the screenshot shows the task's image where the interface put it.
    assert_task_image_painted(shot, interface["images"], cls)


@pytest.mark.timeout(300)
def test_an_import_that_failed_part_way_is_run_again_without_doubling_a_task(client, label_studio, images,
                                                                             monkeypatch):
    """Label Studio goes away after the first batch; the rerun sends only what did not get through."""
    from tasks.labeling import client as client_module

    pid = ensure_project(client, _title("partial-import"), CLASSES)
    monkeypatch.setattr(client_module, "IMPORT_BATCH", 3)  # eight images: batches of 3, 3, 2
    real_import, calls = client.projects.import_tasks, []

    def import_then_fail(**kwargs):
        calls.append(len(kwargs["request"]))
        if len(calls) == 2:
            raise requests.ConnectionError("Label Studio went away")
        return real_import(**kwargs)

    monkeypatch.setattr(client.projects, "import_tasks", import_then_fail)
    with pytest.raises(requests.ConnectionError):
        import_tasks(client, pid, _items(images), files_root=label_studio.files_root)
    assert len(list_tasks(client, pid)) == 3  # the first batch got through

    ids = import_tasks(client, pid, _items(images), files_root=label_studio.files_root)
    tasks = list_tasks(client, pid)
    assert calls == [3, 3, 3, 2]  # the rerun sent the five that were missing, not the eight
    assert len(tasks) == 8 and sorted(ids) == sorted(t["id"] for t in tasks)
    assert [Path(t["data"]["path"]) for t in sorted(tasks, key=lambda t: ids.index(t["id"]))] == \
        [p.resolve() for p, _ in images]
    assert import_tasks(client, pid, _items(images[:2]), files_root=label_studio.files_root) == ids[:2]
    assert len(list_tasks(client, pid)) == 8 and len(calls) == 4  # nothing new: nothing sent
