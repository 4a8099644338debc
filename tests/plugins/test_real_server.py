"""kaizen-report against the real Kaizen app (fake engine, real uvicorn) with a CI token scoped
to the checkout's repository: a local ledger naming a completion served in another repository
gets that completion refused, the CI log says so, and only the covered one gets a verdict."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
from sqlalchemy import select

from server.app import create_app
from server.config import Settings
from server.store.models import CiRun, CompletionOutcome
from server.store.tokens import Role, create_token
from tests.plugins.conftest import Project
from tests.plugins.fake_kaizen import ledger_entry
from tests.utils.fake_engine import FakeEngine
from tests.utils.live_server import live_server

APP = "github.com/acme/app"
OTHER = "github.com/acme/secret"


def test_scoped_token_refusals_reach_the_ci_log(
    settings: Settings, session_factory, project: Project, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    with session_factory() as session:
        _, ide = create_token(session=session, name="alice", role=Role.IDE)
        _, ci = create_token(session=session, name="app-ci", role=Role.CI, repositories=[APP])
    project.git_init("git@github.com:Acme/App.git")
    with live_server(create_app(settings, engine=FakeEngine())) as server:
        editor = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ide}"})

        def complete(repository: str) -> str:
            response = editor.post(
                "/v1/completions",
                json={"model": "fake-model", "prompt": "def f():\n    ", "context": {
                    "repository": repository, "file_path": "src/calc.py"}},
            )  # fmt: skip
            assert response.status_code == 200, response.text
            return response.json()["id"]

        ours, theirs = complete(APP), complete(OTHER)
        pushed = editor.put(
            "/v1/ledger", json={"entries": [ledger_entry(ours, "return a + b", repository=APP)]}
        )
        assert pushed.status_code == 200 and pushed.json()["stored"] == 1, pushed.text
        # A local ledger (say, copied from another checkout) names the foreign completion.
        project.write_ledger(ledger_entry(theirs, "return a - b", repository=APP))
        run = project.kaizen_report(
            "--", sys.executable, "-c", "pass",
            env={"KAIZEN_URL": server.url, "KAIZEN_TOKEN": ci, "KAIZEN_RUN_ID": "ci:1"},
        )  # fmt: skip
        # The same token used in another repository's CI: it may neither read that ledger nor
        # report the run; the build's result is unchanged and the report is kept aside.
        elsewhere = Project(tmp_path / "secret")
        elsewhere.git_init("https://github.com/acme/secret.git")
        foreign = elsewhere.kaizen_report(
            "--", sys.executable, "-c", "pass",
            env={"KAIZEN_URL": server.url, "KAIZEN_TOKEN": ci, "KAIZEN_RUN_ID": "ci:2"},
        )  # fmt: skip
    assert run.returncode == 0, run.output
    assert "kaizen: reported run ci:1: 2 completions (2 passed)" in run.stderr, run.output
    assert (
        f"kaizen: warning: the server refused 1 completion ({theirs}): served in a repository "
        "this CI token does not cover" in run.stderr
    )
    with session_factory() as session:
        verdicts = session.scalars(select(CompletionOutcome.completion_id)).all()
        runs = session.scalars(select(CiRun.run_id)).all()
    assert verdicts == [ours]
    assert foreign.returncode == 0, foreign.output
    assert "could not fetch the ledger" in foreign.stderr
    assert f"--repo {OTHER}" in foreign.stderr and "answered 403" in foreign.stderr
    assert list((elsewhere.path / ".kaizen" / "spool" / "rejected").glob("*.json"))
    assert runs == ["ci:1"]
