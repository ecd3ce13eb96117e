"""Failures reach someone: a server-side Prefect automation posts every failed or crashed flow run to a webhook.

`ensure_failure_webhook(url)` creates, on the Prefect server the client points at
(PREFECT_API_URL), two objects, idempotently by name:

- a Custom Webhook notification block `saofu-failure-webhook` (POST, JSON body), and
- an automation `saofu-flow-run-failures`: an event trigger on `prefect.flow-run.Failed` and
  `prefect.flow-run.Crashed` of any flow run (one firing per flow run), whose action sends a
  notification through that block.

The server's triggers and actions services (on by default in `prefect server start`) evaluate
the automation, so a run that fails in any process, or crashes so hard that no in-process hook
runs, still notifies. Calling it again with another URL updates both in place.

The URL: the `SAOFU_FAILURE_WEBHOOK` environment variable (`serve_all()` in flows/deployments.py
calls this when it is set), or pass one.
"""

from __future__ import annotations

import os
from uuid import UUID

BLOCK_NAME = "saofu-failure-webhook"
AUTOMATION_NAME = "saofu-flow-run-failures"
ENV_VAR = "SAOFU_FAILURE_WEBHOOK"
FAILURE_EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed")

SUBJECT = "saofu: flow run {{ flow_run.name }} {{ flow_run.state.name }}"
# Jinja, rendered by the server's actions service with the triggering flow run in scope.
BODY = ("Flow run {{ flow_run.name }} (id {{ flow_run.id }}) of flow {{ flow.name }} "
        "ended {{ flow_run.state.name }}: {{ flow_run.state.message }}")


def webhook_url_from_env() -> str:
    return os.environ.get(ENV_VAR, "").strip()


def ensure_failure_webhook(url: str = "") -> tuple[UUID, UUID]:
    """Create or update the webhook block and the failure automation; returns (block id, automation id)."""
    from prefect.automations import Automation, EventTrigger, Posture, SendNotification
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    url = url or webhook_url_from_env()
    if not url:
        raise ValueError(f"no webhook URL: pass one or set {ENV_VAR}")

    block = CustomWebhookNotificationBlock(
        name=BLOCK_NAME, url=url, method="POST",
        json_data={"subject": "{{subject}}", "text": "{{body}}", "source": "saofu"},
    )
    block_id = block.save(BLOCK_NAME, overwrite=True)

    trigger = EventTrigger(
        expect=set(FAILURE_EVENTS),
        match={"prefect.resource.id": "prefect.flow-run.*"},
        for_each={"prefect.resource.id"},
        posture=Posture.Reactive,
        threshold=1,
        within=0,
    )
    actions = [SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)]
    description = f"POST every failed or crashed flow run to {url} (block {BLOCK_NAME})"
    try:
        automation = Automation.read(name=AUTOMATION_NAME)
    except ValueError:
        automation = Automation(name=AUTOMATION_NAME, description=description, enabled=True,
                                trigger=trigger, actions=actions).create()
    else:
        automation.description, automation.enabled = description, True
        automation.trigger, automation.actions = trigger, actions
        automation.update()
    assert automation.id is not None
    return block_id, automation.id
