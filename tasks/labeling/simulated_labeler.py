"""A SIMULATED labeler. Not a human: it answers Label Studio tasks from known ground truth.

For demos, tests and benchmarks only, where the data generator knows every image's true class:
it answers open tasks through Label Studio's API, as labelers would, with a configurable error
rate (a wrong class) and skip rate (a cancelled annotation), deterministic for a given seed. It
never runs unless a caller asks for it.

Each simulated annotator is a real Label Studio user (username `sim-1`, e-mail
`sim-1@sim.saofu.invalid`), created through the API when missing; annotations are posted by the
admin's token with `completed_by` set to that user, so the export names the simulated annotator
exactly as it would name a person, and several annotators can disagree on one task.

Annotations are posted from a few threads at once, as a team labels side by side: Label Studio
takes about 90 ms to store one (its signals and project statistics), and on a 2-core machine two
requests in flight store 200 in 9.6 s instead of 18.1 (four: no faster there, 2026-12-07). The
answers do not depend on the order, so the threads change only the time.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from label_studio_sdk import LabelStudio

from saofu.errors import SaofuError
from tasks.labeling.client import CHOICES_NAME, IMAGE_NAME, list_tasks, project_classes

SIM_EMAIL_DOMAIN = "sim.saofu.invalid"  # `.invalid` is reserved: these addresses reach nobody
POSTING_THREADS = 4  # annotations in flight at once (module docstring: 2 already halve the time)


def ensure_users(client: LabelStudio, names: Sequence[str]) -> dict[str, int]:
    """Label Studio users for the simulated annotators, created when missing.

    Args:
        client: SDK client with an admin's token.
        names: usernames, e.g. ("sim-1", "sim-2").

    Returns:
        username -> user id.
    """
    existing = {u.username: int(u.id) for u in client.users.list() if u.username}
    ids = {}
    for name in names:
        if name not in existing:
            user = client.users.create(username=name, email=f"{name}@{SIM_EMAIL_DOMAIN}", first_name=name)
            existing[name] = int(user.id)
        ids[name] = existing[name]
    return ids


def _choice_result(label: str) -> list[dict[str, Any]]:
    return [{"from_name": CHOICES_NAME, "to_name": IMAGE_NAME, "type": "choices", "value": {"choices": [label]}}]


def _check_rates(error_rate: float, skip_rate: float, annotators: Sequence[str]) -> None:
    for name, rate in (("error_rate", error_rate), ("skip_rate", skip_rate)):
        if not 0.0 <= rate <= 1.0:
            raise SaofuError(f"{name} must be within [0, 1], got {rate}")
    if not annotators:
        raise SaofuError("simulate_labeling needs at least one annotator name")


def _answer(rng: random.Random, true_label: str, classes: Sequence[str], error_rate: float, skip_rate: float):
    """One simulated decision: (label or None when skipped, outcome name)."""
    # both draws always happen, so changing one rate does not reshuffle the other's outcomes
    u_skip, u_err = rng.random(), rng.random()
    if u_skip < skip_rate:
        return None, "skipped"
    if u_err < error_rate:
        return rng.choice([c for c in classes if c != true_label]), "wrong"
    return true_label, "correct"


def simulate_labeling(
    client: LabelStudio,
    project_id: int,
    truth: Callable[[dict[str, Any]], str],
    error_rate: float = 0.0,
    seed: int = 0,
    annotators: Sequence[str] = ("sim-1",),
    limit: int | None = None,
    skip_rate: float = 0.0,
) -> dict[str, Any]:
    """SIMULATION: answer the project's open tasks from ground truth, as simulated annotators.

    Every annotator answers every task it has not answered yet (several annotators give the
    overlap the ingest's majority vote works on). Outcomes depend only on (seed, task id,
    annotator), not on the order tasks are visited.

    Args:
        client: SDK client with an admin's token.
        project_id: the project.
        truth: the true class of a task, from the task dict (`id`, `data` with `path`, `sha256`...).
        error_rate: probability of a wrong class (chosen uniformly among the others).
        seed: random seed.
        annotators: simulated annotators' usernames.
        limit: answer at most this many tasks (None: all open ones).
        skip_rate: probability of skipping (a cancelled annotation, no label).

    Returns:
        Counts: `tasks` answered, `annotations` created, `correct`, `wrong`, `skipped`, and
        `annotators` (username -> user id).
    """
    _check_rates(error_rate, skip_rate, annotators)
    classes = project_classes(client.projects.get(id=project_id).label_config)
    if error_rate > 0 and len(classes) < 2:
        raise SaofuError("a wrong label needs at least two classes")
    users = ensure_users(client, annotators)
    answers: list[tuple[int, str, str | None, float]] = []  # (task, annotator, label or None: skip, lead time)
    outcomes: Counter[str] = Counter()
    n_tasks = 0
    for task in sorted(list_tasks(client, project_id), key=lambda t: t["id"]):
        if limit is not None and n_tasks >= limit:
            break
        todo = _open_for(task, annotators, users)
        if not todo:
            continue
        true_label = truth(task)
        if true_label not in classes:
            raise SaofuError(f"truth gave {true_label!r} for task {task['id']}, not a project class {classes}")
        for name in todo:
            rng = random.Random(f"{seed}:{task['id']}:{name}")
            label, outcome = _answer(rng, true_label, classes, error_rate, skip_rate)
            answers.append((task["id"], name, label, round(rng.uniform(1.0, 8.0), 2)))  # simulated seconds
            outcomes[outcome] += 1
        n_tasks += 1

    def post(answer: tuple[int, str, str | None, float]) -> None:
        task_id, name, label, lead_time = answer
        client.annotations.create(
            id=task_id,
            result=[] if label is None else _choice_result(label),
            was_cancelled=label is None,
            completed_by=users[name],
            lead_time=lead_time,
        )

    with ThreadPoolExecutor(POSTING_THREADS) as pool:
        posts = [pool.submit(post, answer) for answer in answers]
        try:
            for done in posts:
                done.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # post nothing more after the first failure
            raise
    return {"tasks": n_tasks, "annotations": len(answers),
            **{k: outcomes[k] for k in ("correct", "wrong", "skipped")}, "annotators": users}


def _open_for(task: Mapping[str, Any], annotators: Sequence[str], users: Mapping[str, int]) -> list[str]:
    """The annotators who have not answered this task yet."""
    done = set()
    for ann in task.get("annotations") or []:
        who = ann.get("completed_by")
        done.add(who.get("id") if isinstance(who, Mapping) else who)
    return [name for name in annotators if users[name] not in done]
