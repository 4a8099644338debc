"""collect_completions: the checkout's ledgers, the server's, and the working tree together."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from kaizen_client.client import KaizenClient
from kaizen_client.collect import collect_completions, settings_from

from tests.plugins.fake_kaizen import FakeKaizen, ledger_entry, unused_url

REPO = "github.com/acme/mono"


def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "mono"
    (root / "svc").mkdir(parents=True)
    (root / "svc" / "mod.py").write_text("def f():\n    return 1\n\n\ndef g():\n    return 2\n")
    (root / "top.py").write_text("X = 40 + 2\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(
        ["git", "remote", "add", "origin", "https://ci:tok@GitHub.com/Acme/Mono.git"],
        cwd=root,
        check=True,
    )
    for folder, entry in (
        (root, ledger_entry("cmpl-top", "40 + 2", repository=REPO, file_path="top.py")),
        (root / "svc", ledger_entry("cmpl-f", "return 1", repository=REPO, file_path="svc/mod.py")),
    ):
        (folder / ".kaizen").mkdir()
        (folder / ".kaizen" / "ledger.jsonl").write_text(json.dumps(entry) + "\n")
    return root


def test_local_ledgers_and_the_server_are_merged(tmp_path: Path, kaizen_server: FakeKaizen) -> None:
    root = checkout(tmp_path)
    kaizen_server.ledger = [
        ledger_entry("cmpl-g", "return 2", repository=REPO, file_path="svc/mod.py"),
    ]
    client = KaizenClient(kaizen_server.url, kaizen_server.token)
    found = collect_completions(root / "svc", client)
    assert found.root == root.resolve() and found.repository == REPO
    assert found.ledger_error is None
    assert (found.local_entries, found.server_entries) == (2, 1)
    lines = {item.entry.completion_id: item.start_line for item in found.located}
    assert lines == {"cmpl-top": 1, "cmpl-f": 2, "cmpl-g": 6}


def test_server_down_leaves_the_local_ledger(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    found = collect_completions(root, KaizenClient(unused_url(), "t"))
    assert found.ledger_error and "failed" in found.ledger_error
    assert [item.entry.completion_id for item in found.located] == ["cmpl-top"]


def test_settings() -> None:
    assert not settings_from(environ={}).enabled
    assert not settings_from(environ={"KAIZEN_URL": "  "}).enabled
    env = {"KAIZEN_URL": "http://a", "KAIZEN_TOKEN": "t"}
    assert settings_from(environ=env) == settings_from("http://a", "t", environ={})
    assert settings_from("http://b", environ=env).url == "http://b"
