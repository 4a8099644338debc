"""Tabby's API under /v1/tabby, in the shapes tabby-agent 1.5.0 sends (fake engine).

The request bodies are the agent's (clients/tabby-agent/src/codeCompletion/buildRequest.ts,
http/tabbyApiClient.ts at TabbyML/tabby 21b2904); the real agent drives them in
tests/integration/test_tabby_agent.py.
"""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.engine.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from tests.utils.fake_engine import FakeEngine

BASE = "/v1/tabby"


def _segments(**extra: object) -> dict[str, object]:
    return {
        "prefix": "def add(a, b):\n    return ",
        "suffix": "\n\nprint(add(1, 2))\n",
        "filepath": "src/calc.py",
        "git_url": "git@github.com:Acme/App.git",
        **extra,
    }


def _complete(client: TestClient, auth, **segments: object) -> dict:  # type: ignore[no-untyped-def,type-arg]
    response = client.post(
        f"{BASE}/v1/completions",
        headers=auth["ide"],
        json={"language": "python", "segments": _segments(**segments)},
    )
    assert response.status_code == 200, response.text
    return response.json()


def _record(client: TestClient, auth, cid: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """The served record as ops sees it, once the recorder has written it."""
    client.portal.call(client.app.state.recorder.flush)  # type: ignore[attr-defined]
    response = client.get(f"/v1/completions/{cid}", headers=auth["ops"])
    assert response.status_code == 200, response.text
    return response.json()


def test_health_has_what_the_agent_reads(client: TestClient, auth) -> None:
    for method in ("GET", "POST"):  # the agent retries as POST on a 405
        response = client.request(method, f"{BASE}/v1/health", headers=auth["ide"])
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "fake-model"  # non-empty: the agent enables completion
        assert "chat_model" not in body  # chat stays off: Tabby's chat is not served
        assert body["version"]["git_describe"].startswith("kaizen-v")
        assert body["device"] in ("cpu", "cuda")


def test_health_without_a_token_is_401_so_the_agent_says_unauthorized(client: TestClient) -> None:
    assert client.get(f"{BASE}/v1/health").status_code == 401
    bad = {"Authorization": "Bearer kz_nope"}
    assert client.get(f"{BASE}/v1/health", headers=bad).status_code == 401


def test_server_setting_turns_off_the_agents_telemetry(client: TestClient, auth) -> None:
    response = client.get(f"{BASE}/v1beta/server_setting", headers=auth["ide"])
    assert response.json() == {"disable_client_side_telemetry": True}


def test_completion_from_segments_is_fim_recorded_with_context(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    body = _complete(client, auth)
    assert body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "x = 0  # base\nreturn x\n"}]
    prompt, _, params = fake_engine.requests[-1]
    assert prompt == (
        f"{FIM_PREFIX}def add(a, b):\n    return {FIM_SUFFIX}\n\nprint(add(1, 2))\n{FIM_MIDDLE}"
    )
    # Tabby's defaults where the request is silent.
    assert params.max_tokens == 64 and params.temperature == 0.1
    assert "\nprint(" in params.stop  # the suffix stops apply
    record = _record(client, auth, body["id"])
    assert record["prompt"] == "def add(a, b):\n    return "
    assert record["suffix"] == "\n\nprint(add(1, 2))\n"
    assert record["language"] == "python"
    assert record["file_path"] == "src/calc.py"
    assert record["repository"] == "github.com/acme/app"  # normalised like the extension's


def test_temperature_and_seed_are_taken_from_the_request(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    response = client.post(
        f"{BASE}/v1/completions",
        headers=auth["ide"],
        json={"segments": {"prefix": "x = "}, "temperature": 0.7, "seed": 3},
    )
    assert response.status_code == 200, response.text
    params = fake_engine.requests[-1][2]
    assert (params.temperature, params.seed) == (0.7, 3)


def test_declarations_and_snippets_become_the_repository_level_prompt(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    body = _complete(
        client,
        auth,
        declarations=[{"filepath": "src/ops.py", "body": "def sub(a, b): ..."}],
        relevant_snippets_from_changed_files=[
            {"filepath": "src/mul.py", "body": "def mul(a, b): ...", "score": 0.9}
        ],
        relevant_snippets_from_recently_opened_files=[
            {"filepath": "README.md", "body": "calc", "score": 1}
        ],
        clipboard="hunter2",
    )
    prompt = fake_engine.requests[-1][0]
    context = (
        "<|repo_name|>app\n"
        "<|file_sep|>src/ops.py\ndef sub(a, b): ...\n"
        "<|file_sep|>src/mul.py\ndef mul(a, b): ...\n"
        "<|file_sep|>README.md\ncalc\n"
        "<|file_sep|>src/calc.py\n"
    )
    assert prompt.startswith(context + FIM_PREFIX + "def add(a, b):")
    assert "hunter2" not in prompt  # the clipboard never reaches the model
    record = _record(client, auth, body["id"])
    # Recorded as the model saw it, so the trainer can rebuild the same prompt.
    assert record["params"]["fim_context"] == context


def test_too_much_context_is_trimmed_snippets_first_then_the_prefix(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    # The fake engine: one token per character, a context of 256; 64 are kept for the
    # completion, so the prompt gets 192.
    prefix = "".join(f"line{i} = {i}\n" for i in range(20)) + "total = "
    snippets = [{"filepath": f"src/m{i}.py", "body": "y" * 50} for i in range(3)]
    body = _complete(client, auth, prefix=prefix, suffix="\n", declarations=snippets)
    prompt, _, params = fake_engine.requests[-1]
    assert len(fake_engine.tokenize(prompt)) <= 192 and params.max_tokens == 64
    assert "src/m" not in prompt  # every snippet dropped before the prefix was cut
    record = _record(client, auth, body["id"])
    assert record["prompt"].endswith("line19 = 19\ntotal = ")  # the end near the cursor kept
    assert record["prompt"].startswith("line")  # cut at a line start, not mid-line
    assert len(record["prompt"]) < len(prefix)

    # With a short prefix the snippets that fit stay, the lowest-ranked dropped first.
    _complete(client, auth, prefix="total = ", suffix="\n", declarations=snippets)
    prompt = fake_engine.requests[-1][0]
    assert "src/m0.py" in prompt and "src/m2.py" not in prompt


def test_next_edit_mode_is_refused_with_what_to_do(client: TestClient, auth) -> None:
    response = client.post(
        f"{BASE}/v1/completions",
        headers=auth["ide"],
        json={"segments": {"prefix": "x"}, "mode": "next_edit_suggestion"},
    )
    assert response.status_code == 400
    assert "next-edit" in response.json()["error"]["message"]


def _event(client: TestClient, auth, cid: str, type_: str, query: str = "", **extra: object):  # type: ignore[no-untyped-def]
    return client.post(
        f"{BASE}/v1/events{query}",
        headers=auth["ide"],
        json={"type": type_, "completion_id": cid, "choice_index": 0, **extra},
    )


def test_view_select_dismiss_become_kaizen_events_and_select_a_ledger_entry(
    client: TestClient, auth
) -> None:
    cid = _complete(client, auth)["id"]
    view = _event(client, auth, cid, "view", view_id="view-1")
    assert view.status_code == 200 and view.content == b""  # Tabby answers an empty body
    select = _event(client, auth, cid, "select", view_id="view-1", elapsed=900)
    assert select.status_code == 200, select.text
    other = _complete(client, auth)["id"]
    assert _event(client, auth, other, "dismiss").status_code == 200

    detail = _record(client, auth, cid)
    assert [e["type"] for e in detail["events"]] == ["shown", "accepted"]
    assert len({e["id"] for e in detail["events"]}) == 2  # ids made by the server
    [entry] = detail["ledger"]
    assert entry["repository"] == "github.com/acme/app"
    assert entry["file_path"] == "src/calc.py"
    assert entry["inserted_text"] == entry["current_text"] == "x = 0  # base\nreturn x\n"
    # CI finds it by its repository, with no extension of ours in the editor.
    ledger = client.get(
        "/v1/ledger", params={"repository": "github.com/acme/app"}, headers=auth["ci"]
    ).json()
    assert [e["completion_id"] for e in ledger["data"]] == [cid]
    dismissed = _record(client, auth, other)
    assert [e["type"] for e in dismissed["events"]] == ["rejected"]
    assert dismissed["ledger"] == []


def test_select_line_is_a_partial_acceptance_of_the_first_line(client: TestClient, auth) -> None:
    cid = _complete(client, auth)["id"]
    # The agent sends select_kind both in the query and in the body.
    response = _event(client, auth, cid, "select", "?select_kind=line", select_kind="line")
    assert response.status_code == 200, response.text
    detail = _record(client, auth, cid)
    [event] = detail["events"]
    assert event["type"] == "partially_accepted"
    assert event["accepted_length"] == len("x = 0  # base")
    assert detail["ledger"][0]["inserted_text"] == "x = 0  # base"


def test_without_git_url_there_is_no_ledger_entry_but_the_event_is_stored(
    client: TestClient, auth
) -> None:
    cid = _complete(client, auth, git_url=None)["id"]
    assert _event(client, auth, cid, "select").status_code == 200
    detail = _record(client, auth, cid)
    assert [e["type"] for e in detail["events"]] == ["accepted"]
    assert detail["ledger"] == []


def test_events_for_unknown_or_foreign_completions_are_refused(
    client: TestClient, auth, session_factory
) -> None:  # type: ignore[no-untyped-def]
    from server.store.tokens import Role, create_token

    assert _event(client, auth, "cmpl-nope", "view").status_code == 404
    cid = _complete(client, auth)["id"]
    with session_factory() as session:
        bob = create_token(session=session, name="bob", role=Role.IDE)[1]
    response = client.post(
        f"{BASE}/v1/events",
        headers={"Authorization": f"Bearer {bob}"},
        json={"type": "select", "completion_id": cid, "choice_index": 0},
    )
    assert response.status_code == 403
    detail = _record(client, auth, cid)
    assert detail["events"] == [] and detail["ledger"] == []


def test_a_prefix_over_the_character_bound_is_cut_not_refused(
    client: TestClient, auth, fake_engine: FakeEngine
) -> None:
    # 256 tokens x 16 characters: the plain API refuses a prompt over 4,096 characters unread.
    prefix = "".join(f"v{i} = {i}\n" for i in range(1500)) + "total = "
    assert len(prefix) > 4096
    body = _complete(client, auth, prefix=prefix, suffix="\n")
    record = _record(client, auth, body["id"])
    assert record["prompt"].endswith("v1499 = 1499\ntotal = ")
    assert len(fake_engine.tokenize(fake_engine.requests[-1][0])) <= 192
