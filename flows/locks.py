"""One change at a time per registered model: a Prefect global concurrency limit keyed on its name.

Every flow that can move a registry alias of a model (the release, the fast retrain) holds the
model's slot while it runs, so two of them started together run one after the other instead of
racing on `@champion`. The slot lives on the Prefect server (or the ephemeral API's database),
so it holds across processes and machines.

Prefect 3.9 acquires from a limit that exists (`strict=True` fails loudly instead of silently
running unlimited when it does not), so the limit is created with one slot on first use. A flow
that holds the slot and runs another flow as a subflow (the fast retrain runs the release) does
not take it again: the held names are kept in a context variable of the run.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_held: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("saofu_model_locks", default=frozenset())


def lock_name(registered_model: str) -> str:
    return f"saofu-model:{registered_model}"


def ensure_limit(name: str) -> None:
    """Create the one-slot limit `name` unless it exists (its slot count is left as a person set it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except Exception:  # noqa: BLE001 - created by a flow starting at the same moment: fine
                client.read_global_concurrency_limit_by_name(name)


@contextmanager
def model_lock(registered_model: str, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the registered model's slot for the block (waiting for it while another run holds it)."""
    from prefect.concurrency.sync import concurrency

    name = lock_name(registered_model)
    held = _held.get()
    if name in held:
        yield
        return
    ensure_limit(name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        token = _held.set(held | {name})
        try:
            yield
        finally:
            _held.reset(token)
