"""A 500 tells the client an incident id, never the exception's text (issue 15, hole 9).

An inference failure used to answer `inference failed: RuntimeError: <message>`, whatever the
message held (paths, versions, internals). The answer now carries an incident id; the server's
log has the traceback under the same id, and the app goes on answering.
"""

from __future__ import annotations

import logging

import httpx
import pytest

from deploy.loaded_model import LoadedModel
from tests.deploy.test_serving import config, images, post, running, store  # noqa: F401 - fixtures

SECRET = "/srv/models/secret-token-7f3a9 internal detail"


@pytest.mark.timeout(180)
def test_an_inference_failure_answers_an_incident_id_and_logs_the_detail(store, images, monkeypatch, caplog):  # noqa: F811
    real = LoadedModel.probabilities
    failing = {"on": False}  # the model loads and warms up first

    def probabilities(self, pixels):
        if failing["on"]:
            raise RuntimeError(SECRET)
        return real(self, pixels)

    monkeypatch.setattr(LoadedModel, "probabilities", probabilities)
    caplog.set_level(logging.ERROR, logger="saofu.serve")
    with running(config(store)) as url, httpx.Client(timeout=10) as client:
        assert post(client, url, images[0]).status_code == 200
        failing["on"] = True
        broken = post(client, url, images[0])
        assert broken.status_code == 500
        body = broken.json()
        assert "secret" not in broken.text and "RuntimeError" not in broken.text, broken.text
        assert body["incident"] and body["incident"] in body["error"]
        logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
        assert body["incident"] in logged
        failing["on"] = False
        assert post(client, url, images[0]).status_code == 200  # and it goes on serving
