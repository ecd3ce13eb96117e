"""`ensure_project` without a server: a fake SDK client records the calls a real one would get."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from saofu.errors import SaofuError
from tasks.labeling.client import ensure_project, grown_classes, labeling_config, project_classes

pytestmark = pytest.mark.timeout(30)


class FakeProjects:
    """`client.projects` with list/get/create/update over in-memory projects."""

    def __init__(self):
        self.projects: dict[int, SimpleNamespace] = {}
        self.updates: list[dict] = []

    def list(self, title=None):
        return [p for p in self.projects.values() if title is None or title in p.title]

    def get(self, id):
        return self.projects[id]

    def create(self, title, label_config):
        project = SimpleNamespace(id=len(self.projects) + 1, title=title, label_config=label_config)
        self.projects[project.id] = project
        return project

    def update(self, id, **fields):
        self.updates.append({"id": id, **fields})
        for name, value in fields.items():
            setattr(self.projects[id], name, value)
        return self.projects[id]


@pytest.fixture
def client():
    return SimpleNamespace(projects=FakeProjects())


def test_same_set_in_any_order_updates_nothing(client):
    pid = ensure_project(client, "fu", ["fu", "not_fu"])
    assert ensure_project(client, "fu", ["not_fu", "fu"]) == pid
    assert client.projects.updates == []


def test_superset_appends_new_classes_after_the_existing_order(client, capsys):
    pid = ensure_project(client, "fu", ["not_fu", "fu"])
    assert ensure_project(client, "fu", ["zeta", "fu", "not_fu", "fu_merchant"]) == pid
    (update,) = client.projects.updates
    assert update == {"id": pid, "label_config": labeling_config(["not_fu", "fu", "zeta", "fu_merchant"])}
    assert project_classes(client.projects.get(pid).label_config) == ["not_fu", "fu", "zeta", "fu_merchant"]
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "['zeta', 'fu_merchant']" in out and "'fu'" in out and f"id {pid}" in out
    # grown once: asking again changes nothing
    assert ensure_project(client, "fu", ["fu", "not_fu", "fu_merchant", "zeta"]) == pid
    assert len(client.projects.updates) == 1


def test_removing_a_class_is_refused_and_names_it(client):
    ensure_project(client, "fu", ["fu", "not_fu"])
    with pytest.raises(SaofuError, match=r"would remove \['not_fu'\].*with annotations is refused"):
        ensure_project(client, "fu", ["fu", "fu_merchant"])
    with pytest.raises(SaofuError, match=r"would remove \['not_fu'\]"):
        ensure_project(client, "fu", ["fu"])
    assert client.projects.updates == []


def test_growth_can_be_turned_off(client):
    ensure_project(client, "fu", ["fu", "not_fu"])
    with pytest.raises(SaofuError, match=r"missing \['fu_merchant'\].*allow_growth=False"):
        ensure_project(client, "fu", ["fu", "not_fu", "fu_merchant"], allow_growth=False)
    assert ensure_project(client, "fu", ["not_fu", "fu"], allow_growth=False) == 1
    assert client.projects.updates == []


def test_title_must_match_exactly(client):
    # the server's title filter matches substrings: "fu" must not find "fu-2"
    other = ensure_project(client, "fu-2", ["a", "b"])
    assert ensure_project(client, "fu", ["fu", "not_fu"]) != other
    assert client.projects.updates == []


def test_grown_classes_plan():
    assert grown_classes("p", ["a", "b"], ["b", "a"]) is None
    assert grown_classes("p", ["a", "b"], ["c", "b", "a", "c"]) == ["a", "b", "c"]
    with pytest.raises(SaofuError, match=r"would remove \['a'\] \(and add \['c'\]\)"):
        grown_classes("p", ["a", "b"], ["b", "c"])
