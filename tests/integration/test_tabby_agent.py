"""The real editor clients against a real Kaizen (the tiny model on vLLM), one engine start.

- **Tabby**: tabby-agent 1.5.0 from the npm registry (pinned with its lock file in
  tests/clients/tabby/), the back end of Tabby's VS Code, IntelliJ, Vim/Neovim and Eclipse
  plugins, run as an LSP server over stdio the way those plugins run it. The test plays the
  editor: it opens a file in a git checkout, asks for an inline completion, reports the view
  and the acceptance as the plugins do (``tabby/telemetry/event``), then checks what Kaizen
  recorded: the completion with its context, the events and the ledger entry CI reads.
- **Continue**: its default autocomplete request and data-destination event (the payloads of
  tests/server/api/test_continue.py, from Continue's sources) against the same server.

Skipped, saying why, only where node and npm are missing (CI has them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import LiveServer, TinyWorld, serve_tiny

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
PIN = ROOT / "tests" / "clients" / "tabby"
AGENT = PIN / "node_modules" / "tabby-agent" / "dist" / "cli.js"
REMOTE = "git@github.com:Acme/Calc.git"
REPOSITORY = "github.com/acme/calc"


@pytest.fixture(scope="module")
def tiny_server(
    tiny_world: TinyWorld, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """conftest's live server (one engine for the module), with Tabby's requests decoded
    greedily: the agent post-processes what it shows, and a sampled reply of the random tiny
    model could come out different, and empty, from one run to the next."""
    with serve_tiny(tiny_world, tmp_path_factory.mktemp("home"), tabby_temperature=0.0) as server:
        yield server


def _install_agent() -> Path:
    """tabby-agent as pinned by package-lock.json (``npm ci``: exactly those versions)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to run tabby-agent (apt-get install nodejs npm)")
    if not AGENT.exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=PIN,
            check=True,
            timeout=600,
        )
    return AGENT


class LspClient:
    """Just enough of an LSP client: Content-Length framing over the agent's stdio, answers
    to the agent's own requests (null: this editor offers nothing extra), and notifications
    kept for inspection."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env
        )
        self._next = 0
        self._lock = threading.Lock()
        self._replies: dict[int, dict[str, Any]] = {}
        self._arrived = threading.Condition(self._lock)
        self.notifications: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _send(self, message: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def _read(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        while True:
            length = None
            while True:
                line = stream.readline()
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            assert length is not None
            message = json.loads(stream.read(length))
            if "id" in message and "method" in message:  # a request from the agent
                self._send({"id": message["id"], "result": None})
            elif "id" in message:
                with self._lock:
                    self._replies[message["id"]] = message
                    self._arrived.notify_all()
            else:
                with self._lock:
                    self.notifications.append(message)

    def request(self, method: str, params: Any, timeout: float = 120) -> Any:
        with self._lock:
            self._next += 1
            ident = self._next
        self._send({"id": ident, "method": method, "params": params})
        deadline = time.monotonic() + timeout
        with self._lock:
            while ident not in self._replies:
                left = deadline - time.monotonic()
                assert left > 0, f"no answer to {method} within {timeout} s"
                self._arrived.wait(left)
            reply = self._replies.pop(ident)
        assert "error" not in reply, reply
        return reply["result"]

    def notify(self, method: str, params: Any) -> None:
        self._send({"method": method, "params": params})

    def close(self) -> None:
        try:
            self.request("shutdown", None, timeout=10)
            self.notify("exit", None)
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class JsonLinesClient:
    """tabby-agent's stdio protocol without ``--lsp``, the one Tabby's plugins built on agent
    1.x speak (IntelliJ, Vim/Neovim): one ``[id, {"func", "args"}]`` line per call to the
    agent, one ``[id, result]`` line back; ``[0, event]`` lines are the agent's own events."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env
        )
        self._next = 0
        self._lock = threading.Condition()
        self._replies: dict[int, Any] = {}
        self.events: list[Any] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ident, result = json.loads(line)
            with self._lock:
                if ident == 0:
                    self.events.append(result)
                else:
                    self._replies[ident] = result
                    self._lock.notify_all()

    def call(self, func: str, *args: Any, timeout: float = 120) -> Any:
        with self._lock:
            self._next += 1
            ident = self._next
        assert self.proc.stdin is not None
        line = json.dumps([ident, {"func": func, "args": list(args)}]) + "\n"
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        with self._lock:
            while ident not in self._replies:
                left = deadline - time.monotonic()
                assert left > 0, f"no answer to {func} within {timeout} s"
                self._lock.wait(left)
            return self._replies.pop(ident)

    def close(self) -> None:
        with contextlib.suppress(AssertionError):  # it may have gone already
            self.call("finalize", timeout=10)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _git_checkout(path: Path) -> Path:
    path.mkdir(parents=True)
    for args in (["init", "-q"], ["remote", "add", "origin", REMOTE]):
        subprocess.run(["git", *args], cwd=path, check=True)
    (path / "src").mkdir()
    return path


def _agent_env(server: LiveServer, home: Path) -> dict[str, str]:
    """A HOME with the agent's config file: what a user puts in the plugin's settings (the
    endpoint and a token). Anonymous usage statistics off: nothing leaves the machine."""
    config = home / ".tabby-client" / "agent" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(
        "[server]\n"
        f'endpoint = "{server.url}/v1/tabby"\n'
        f'token = "{server.secret("ide")}"\n'
        "[anonymousUsageTracking]\n"
        "disable = true\n"
    )
    return {**os.environ, "HOME": str(home)}


def _ops(server: LiveServer, path: str, **params: str) -> Any:
    response = httpx.get(
        f"{server.url}{path}", params=params, headers=server.headers["ops"], timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def _try_ops(server: LiveServer, path: str) -> Any:
    response = httpx.get(f"{server.url}{path}", headers=server.headers["ops"], timeout=30)
    return response.json() if response.status_code == 200 else None


def _until(check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


TEXT = "def add(a, b):\n    return \n\n\nprint(add(1, 2))\n"
CURSOR = len("def add(a, b):\n    return ")


def test_tabby_agent_completes_and_reports_view_and_select(
    tiny_server: LiveServer, tmp_path: Path
) -> None:
    cli = _install_agent()
    checkout = _git_checkout(tmp_path / "calc")
    source = checkout / "src" / "calc.py"
    source.write_text(TEXT)
    log = tmp_path / "agent.log"
    agent = JsonLinesClient(["node", str(cli)], _agent_env(tiny_server, tmp_path / "h"), log)
    try:
        assert agent.call("initialize", {"clientProperties": {"session": {"client": "test"}}})
        # The agent's health check against /v1/tabby/v1/health found a completion model.
        assert agent.call("getStatus") == "ready", _log_tail(log)
        # What a plugin sends when the user asks for a completion at the cursor: the file,
        # its git checkout (root and remotes) and a declaration from the language server.
        response = agent.call(
            "provideCompletions",
            {
                "filepath": str(source),
                "language": "python",
                "text": TEXT,
                "position": CURSOR,
                "manually": True,
                "git": {"root": str(checkout), "remotes": [{"name": "origin", "url": REMOTE}]},
                "declarations": [
                    {
                        "filepath": str(checkout / "src" / "ops.py"),
                        "offset": 0,
                        "text": "def sub(a, b):\n    return a - b\n",
                    }
                ],
            },
        )
        assert response and response["id"].startswith("cmpl-"), _log_tail(log)
        cid = response["id"]
        record = _until(lambda: _try_ops(tiny_server, f"/v1/completions/{cid}"))
        assert record, f"completion {cid} was not recorded"
        # FIM from the agent's segments, the declaration in Qwen's repository-level form,
        # the checkout's origin normalised and the path inside it.
        assert record["prompt"].endswith("def add(a, b):\n    return ")
        assert record["suffix"].startswith("\n")
        assert record["params"]["fim_context"] == (
            "<|repo_name|>calc\n<|file_sep|>src/ops.py\ndef sub(a, b):\n    return a - b\n\n"
            "<|file_sep|>src/calc.py\n"
        )
        assert record["params"]["max_tokens"] == tiny_server.settings.tabby_max_tokens
        assert (record["language"], record["file_path"]) == ("python", "src/calc.py")
        assert record["repository"] == REPOSITORY

        # The plugin shows the completion, then the user accepts it with Tab.
        view = {"type": "view", "completion_id": cid, "choice_index": 0}
        assert agent.call("postEvent", view) is True, _log_tail(log)
        select = {"type": "select", "completion_id": cid, "choice_index": 0, "elapsed": 800}
        assert agent.call("postEvent", select) is True, _log_tail(log)
    finally:
        agent.close()

    detail = _ops(tiny_server, f"/v1/completions/{cid}")
    assert [e["type"] for e in detail["events"]] == ["shown", "accepted"]
    [entry] = detail["ledger"]
    assert entry["inserted_text"] == detail["choices"][0]["text"]
    assert (entry["repository"], entry["file_path"]) == (REPOSITORY, "src/calc.py")
    # CI finds it for its repository: attribution with no Kaizen extension in the editor.
    ledger = _ops(tiny_server, "/v1/ledger", repository="git@github.com:acme/calc.git")
    assert cid in [e["completion_id"] for e in ledger["data"]]


def test_tabby_agent_as_an_lsp_server_completes_through_kaizen(
    tiny_server: LiveServer, tmp_path: Path
) -> None:
    """The agent's ``--lsp`` mode (editors with an LSP client): textDocument/completion. In
    1.5.0 this mode has no way to report events (no ``tabby/telemetry/event``), so the
    events are checked through the protocol above."""
    cli = _install_agent()
    checkout = _git_checkout(tmp_path / "calc")
    source = checkout / "src" / "calc.py"
    source.write_text(TEXT)
    env = _agent_env(tiny_server, tmp_path / "h")
    client = LspClient(["node", str(cli), "--lsp", "--stdio"], env, tmp_path / "lsp.log")
    try:
        root = checkout.as_uri()
        client.request(
            "initialize",
            {
                "processId": os.getpid(),
                "rootUri": root,
                "clientInfo": {"name": "kaizen-test", "version": "1"},
                "capabilities": {"textDocument": {"completion": {}}},
            },
        )
        client.notify("initialized", {})
        uri = source.as_uri()
        client.notify(
            "textDocument/didOpen",
            {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": TEXT}},
        )

        def ask() -> list[dict[str, Any]]:
            result = client.request(
                "textDocument/completion",
                {"textDocument": {"uri": uri}, "position": {"line": 1, "character": 11}},
            )
            return [i for i in (result or {}).get("items", []) if i.get("data")]

        items = _until(ask, timeout=120)
        assert items, _log_tail(tmp_path / "lsp.log")
    finally:
        client.close()
    cid = items[0]["data"]["completionId"]
    record = _ops(tiny_server, f"/v1/completions/{cid}")
    assert record["prompt"].endswith("def add(a, b):\n    return ")
    assert record["language"] == "python"
    # The agent post-processes what it shows (trims, drops repeated lines): some of it.
    shown = items[0]["textEdit"]["newText"].strip()
    assert shown and shown in record["choices"][0]["text"]


def test_continue_default_request_and_data_event_through_the_real_server(
    tiny_server: LiveServer,
) -> None:
    from tests.server.api.test_continue import CONTINUE_STOPS, PROMPT, _data_event

    model = tiny_server.settings.served_model_name
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": 4096,
        "temperature": 0.01,
        "stop": CONTINUE_STOPS,
        "stream": True,
        # Continue's config.yaml: requestOptions.extraBodyProperties (see the README).
        "clamp_max_tokens": True,
    }
    ide = tiny_server.headers["ide"]
    with httpx.stream(
        "POST", f"{tiny_server.url}/v1/completions", json=body, headers=ide, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    cid = chunks[0]["id"]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])

    event = _data_event(True, completion=text, modelName=model)
    answer = httpx.post(
        f"{tiny_server.url}/v1/continue/data", json=event, headers=ide, timeout=30
    ).json()
    assert answer["completion_id"] == cid and answer["stored"], answer
    detail = _ops(tiny_server, f"/v1/completions/{cid}")
    assert detail["params"]["fim_context"].startswith("<|repo_name|>app\n")
    assert detail["prompt"] == "def add(a, b):\n    return "
    assert detail["params"]["max_tokens"] < 4096  # clamped to what fits the context
    assert [e["type"] for e in detail["events"]] == ["accepted"]
    assert detail["ledger"][0]["repository"] == "github.com/acme/app"
