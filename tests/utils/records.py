"""Helpers to read what the recorder wrote."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.store.completions import get_completion
from server.store.models import Completion


def flush(client: TestClient) -> None:
    """Wait until the app's recorder has written everything queued so far."""
    client.portal.call(client.app.state.recorder.flush)  # type: ignore[union-attr]


def fetch(client: TestClient, completion_id: str) -> Completion | None:
    flush(client)
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        return get_completion(session=session, completion_id=completion_id)
