"""The Kaizen VS Code extension in a real VS Code: code-server, driven by Chromium.

code-server 4.100.3 (VS Code 1.100.3 served to a browser; npm, pinned in
tests/clients/code_server/) is installed by tests/clients/code_server/setup.sh under
~/.cache/kaizen-tests/code-server (once; cached), and the extension's .vsix is built from
plugins/vscode and installed with ``code-server --install-extension``. Playwright drives
Debian's Chromium as a developer would: it sets the API token through the command palette,
opens a Python file in a git checkout, types, waits for Kaizen's ghost text, accepts it with
Tab and saves. Then the test checks what the real Kaizen server (the tiny model on the real
vLLM engine) recorded: the completion with its context, the ``shown`` and ``accepted``
events and the ledger entry, which the extension sends in batches, and the workspace ledger.

Skipped only where setup.sh says the machine cannot do it (not root with packages missing,
no apt-get, no Node 20); any other setup failure fails the test with the script's output.
"""

from __future__ import annotations

import importlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import LiveServer, TinyWorld, free_port, serve_tiny
from tests.integration.conftest import tiny_world as tiny_world  # noqa: F401 (fixture)

pytestmark = pytest.mark.engine

HERE = Path(__file__).resolve().parent
SETUP = HERE / "code_server" / "setup.sh"
REMOTE = "git@github.com:Acme/Calc.git"
REPOSITORY = "github.com/acme/calc"
# Line 2 is where the developer types; "return " is what they type there.
TEXT = "def add(a, b):\n    \n\n\nprint(add(1, 2))\n"
TYPED = "return "
PREFIX = "def add(a, b):\n    " + TYPED


@dataclass
class Tools:
    code_server: Path
    vsix: Path
    chromium: Path


@pytest.fixture(scope="session")
def code_server_tools() -> Tools:
    """setup.sh: idempotent and cached; a few seconds once it has run."""
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=1800
    )
    output = f"{run.stdout}\n{run.stderr}"
    if run.returncode == 77:
        pytest.skip(f"code-server cannot be set up on this machine: {run.stderr.strip()}")
    assert run.returncode == 0, f"{SETUP} failed (exit {run.returncode}):\n{output[-8000:]}"
    importlib.invalidate_caches()  # setup.sh may have just pip-installed playwright
    values = dict(
        line.split("=", 1) for line in run.stdout.splitlines() if line.startswith("KAIZEN_")
    )
    return Tools(
        code_server=Path(values["KAIZEN_CODE_SERVER"]),
        vsix=Path(values["KAIZEN_VSIX"]),
        chromium=Path(values["KAIZEN_CHROMIUM"]),
    )


@pytest.fixture(scope="module")
def tiny_server(
    tiny_world: TinyWorld,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    with serve_tiny(tiny_world, tmp_path_factory.mktemp("home")) as server:
        yield server


@dataclass
class CodeServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    user_data: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def diagnostics(self) -> str:
        """code-server's log and the extension's own output channel (**Kaizen**), for a
        failure's message."""
        parts = [f"code-server log (tail):\n{self.log_tail()}"]
        for channel in sorted(self.user_data.glob("logs/*/exthost*/output_logging_*/*Kaizen.log")):
            parts.append(f"{channel.name}:\n{channel.read_text(errors='replace')[-4000:]}")
        return "\n\n".join(parts)


def _git_checkout(path: Path) -> Path:
    path.mkdir(parents=True)
    for args in (["init", "-q"], ["remote", "add", "origin", REMOTE]):
        subprocess.run(["git", *args], cwd=path, check=True)
    (path / "src").mkdir()
    (path / "src" / "calc.py").write_text(TEXT)
    return path


def _settings(server: LiveServer) -> dict[str, Any]:
    """User settings: the extension's own keys (package.json's contributes.configuration),
    and a quiet VS Code: no welcome page, no word suggestions competing with the ghost text."""
    return {
        "kaizen.serverUrl": server.url,
        "kaizen.model": server.settings.served_model_name,
        "kaizen.maxTokens": 12,
        "kaizen.debounceMs": 300,
        "kaizen.singleLine": True,
        "editor.inlineSuggest.enabled": True,
        "editor.quickSuggestions": {"other": "off", "comments": "off", "strings": "off"},
        "editor.suggestOnTriggerCharacters": False,
        "editor.wordBasedSuggestions": "off",
        "editor.autoClosingBrackets": "never",
        "editor.autoClosingQuotes": "never",
        "files.autoSave": "off",
        "workbench.startupEditor": "none",
        "workbench.tips.enabled": False,
        "workbench.enableExperiments": False,
        "security.workspace.trust.enabled": False,
        "extensions.ignoreRecommendations": True,
        "telemetry.telemetryLevel": "off",
        "update.mode": "none",
        "git.enabled": False,
    }


def _base_args(tools: Tools, root: Path) -> list[str]:
    return [
        "node",
        str(tools.code_server),
        "--user-data-dir",
        str(root / "user-data"),
        "--extensions-dir",
        str(root / "extensions"),
    ]


@pytest.fixture
def code_server(
    code_server_tools: Tools, tiny_server: LiveServer, tmp_path: Path
) -> Iterator[CodeServer]:
    root = tmp_path / "code-server"
    home = root / "home"
    home.mkdir(parents=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
    }
    base = _base_args(code_server_tools, root)
    installed = subprocess.run(
        [*base, "--install-extension", str(code_server_tools.vsix)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    listed = subprocess.run(
        [*base, "--list-extensions", "--show-versions"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "kaizen.kaizen-vscode@0.1.0" in listed.stdout, listed.stdout + listed.stderr
    settings = root / "user-data" / "User" / "settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(_settings(tiny_server), indent=2))

    port = free_port()
    log = root / "code-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *base,
                "--auth",
                "none",
                "--bind-addr",
                f"127.0.0.1:{port}",
                "--disable-telemetry",
                "--disable-update-check",
                "--disable-workspace-trust",
                "--disable-getting-started-override",
                "--ignore-last-opened",
                "--log",
                "debug",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    running = CodeServer(url=url, proc=proc, log=log, user_data=root / "user-data")
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, running.log_tail()
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "code-server did not start\n" + running.log_tail()
            time.sleep(0.25)
        yield running
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ops(server: LiveServer, path: str, **params: str) -> Any:
    response = httpx.get(
        f"{server.url}{path}", params=params, headers=server.headers["ops"], timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def _until(check: Any, timeout: float = 60, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def _accepted_ids(server: LiveServer) -> list[str]:
    """Completions with an ``accepted`` event, straight from the server's database."""
    path = server.settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT DISTINCT completion_id FROM completion_events WHERE type = 'accepted'"
        ).fetchall()
    return [r[0] for r in rows]


def test_extension_in_code_server_completes_accepts_and_reports(
    code_server: CodeServer,
    code_server_tools: Tools,
    tiny_server: LiveServer,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import Page, sync_playwright

    checkout = _git_checkout(tmp_path / "calc")
    source = checkout / "src" / "calc.py"
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def command(page: Page, name: str) -> None:
        page.keyboard.press("F1")
        box = page.locator(".quick-input-widget input.input")
        box.wait_for(state="visible", timeout=30_000)
        box.fill(f">{name}")
        page.locator(".quick-input-list .monaco-list-row", has_text=name).first.wait_for(
            timeout=30_000
        )
        page.keyboard.press("Enter")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(code_server_tools.chromium), args=["--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            page.goto(f"{code_server.url}/?folder={checkout}", timeout=120_000)
            page.locator(".monaco-workbench").wait_for(timeout=120_000)
            # The extension is running once its status bar item shows (the key: no token yet).
            kaizen_item = page.locator(".statusbar-item", has_text="Kaizen")
            kaizen_item.first.wait_for(timeout=120_000)

            # The token, the way the README tells a developer to set it.
            command(page, "Kaizen: Set API Token")
            box = page.locator(".quick-input-widget input.input")
            _until(lambda: box.get_attribute("type") == "password", timeout=30)
            box.fill(tiny_server.secret("ide"))
            page.keyboard.press("Enter")
            page.locator(".statusbar-item .codicon-sparkle").first.wait_for(timeout=30_000)

            # Open src/calc.py from quick open.
            page.keyboard.press("Control+P")
            box.wait_for(state="visible", timeout=30_000)
            box.fill("calc.py")
            page.locator(".quick-input-list .monaco-list-row", has_text="calc.py").first.wait_for(
                timeout=30_000
            )
            page.keyboard.press("Enter")
            editor = page.locator(".monaco-editor .view-lines").first
            editor.wait_for(timeout=60_000)
            page.locator(".tab.active", has_text="calc.py").wait_for(timeout=30_000)
            editor.click()
            # Line 2, its end (after the indentation), then type as a developer does.
            page.keyboard.press("Control+Home")
            page.keyboard.press("ArrowDown")
            page.keyboard.press("End")
            page.keyboard.type(TYPED, delay=40)

            ghost = page.locator(
                ".monaco-editor .ghost-text-decoration, .monaco-editor .ghost-text"
            )
            ghost.first.wait_for(state="visible", timeout=120_000)
            shown_text = ghost.first.inner_text()
            page.screenshot(path=str(shots / "ghost-text.png"))
            page.keyboard.press("Tab")
            ghost.first.wait_for(state="detached", timeout=30_000)
            page.keyboard.press("Control+S")
            saved = _until(lambda: source.read_text() != TEXT, timeout=30)
            page.screenshot(path=str(shots / "accepted.png"))
            assert saved, "the file was not saved with the accepted completion"
            after = source.read_text()

            # The extension batches events (every 5 s): wait for them.
            accepted = _until(lambda: _accepted_ids(tiny_server), timeout=60)
            assert accepted, "no accepted event reached Kaizen"
            [cid] = accepted

            def detail_complete() -> Any:
                detail = _ops(tiny_server, f"/v1/completions/{cid}")
                types = [e["type"] for e in detail["events"]]
                return detail if "accepted" in types and detail["ledger"] else None

            detail = _until(detail_complete, timeout=60)
            assert detail, _ops(tiny_server, f"/v1/completions/{cid}")
        except Exception as error:
            raise AssertionError(
                f"{error}\n\nscreenshots in {shots}\n\n{code_server.diagnostics()}"
            ) from error
        finally:
            page.screenshot(path=str(shots / "last.png"))
            browser.close()

    # The completion as served: the prompt up to the cursor, the file's rest as the suffix,
    # the checkout's origin normalised and the path inside it.
    assert detail["prompt"].endswith(PREFIX), detail["prompt"]
    assert detail["suffix"].startswith("\n\n\nprint(add(1, 2))"), detail["suffix"]
    assert (detail["language"], detail["file_path"]) == ("python", "src/calc.py")
    assert detail["repository"] == REPOSITORY
    served = detail["choices"][0]["text"]
    # Shown, then accepted with Tab (and nothing else).
    assert [e["type"] for e in detail["events"]] == ["shown", "accepted"], detail["events"]

    # What Tab put in the file is the completion's (cleaned-up) text, after what was typed.
    [entry] = detail["ledger"]
    inserted = entry["inserted_text"]
    assert inserted and served.startswith(inserted), (served, inserted)
    assert after == PREFIX + inserted + TEXT[len("def add(a, b):\n    ") :], after
    assert shown_text.replace("\u00a0", " ").strip() in inserted, (shown_text, inserted)
    assert (entry["repository"], entry["file_path"]) == (REPOSITORY, "src/calc.py")
    assert entry["state"] == "active" and entry["current_text"] == inserted
    assert entry["start_offset"] == len(PREFIX)

    # The workspace ledger, beside the repository (ignored by git), names the same completion.
    lines = [json.loads(line) for line in (checkout / ".kaizen" / "ledger.jsonl").open()]
    assert lines and lines[-1]["completion_id"] == cid
    assert lines[-1]["inserted_text"] == inserted
    # And CI finds it for its repository.
    ledger = _ops(tiny_server, "/v1/ledger", repository="https://github.com/acme/calc")
    assert cid in [e["completion_id"] for e in ledger["data"]]
