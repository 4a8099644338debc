"""The ops dashboard in a real Chromium (Playwright): a real server over a database with
recorded rows (completions, IDE events, CI outcomes, registry moves, a training round), logged
in through the form with an ops token; the charts hold one point per version and day that has
data, the rollout events are drawn, the session cookie is HttpOnly and SameSite=Strict, and an
ide token is refused. Screenshots go to the test's tmp dir."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from server.app import create_app
from server.config import Settings
from server.services.sessions import COOKIE
from server.store.models import AdapterTransition, RolloutState
from tests.utils.adapters import BASE_SHA
from tests.utils.browser import browser, chromium  # noqa: F401  (session fixtures)
from tests.utils.dashboard_rows import completion, event, outcome, registry_history
from tests.utils.fake_engine import FakeEngine
from tests.utils.live_server import live_server

# (adapter, days ago, completions, shown, accepted, CI verdicts)
PLAN: list[tuple[str | None, int, int, int, int, list[str]]] = [
    (None, 6, 4, 4, 1, ["passed", "failed"]),
    (None, 5, 4, 4, 2, []),
    ("kaizen-r0", 4, 5, 5, 3, ["passed", "passed", "failed"]),
    ("kaizen-r0", 3, 5, 4, 3, ["passed"]),
    ("kaizen-r0", 2, 5, 0, 0, ["passed", "failed"]),
    ("kaizen-r0", 1, 5, 5, 4, ["passed"]),
    ("kaizen-r0", 0, 5, 5, 2, ["failed"]),
    ("kaizen-r1", 2, 3, 3, 1, ["failed", "failed"]),
    ("kaizen-r1", 1, 3, 2, 0, []),
    ("kaizen-r2", 0, 4, 4, 3, ["passed", "passed"]),
]
ACCEPTANCE_POINTS = sum(1 for *_, shown, _, _ in PLAN if shown)  # 9
CI_POINTS = sum(1 for *_, verdicts in PLAN if verdicts)  # 8
# When each move of registry_history happened, in days before now.
MOVES = {
    ("kaizen-r0", "canary"): 5.5,
    ("kaizen-r0", "active"): 4.5,
    ("kaizen-r1", "canary"): 2.5,
    ("kaizen-r1", "retired"): 1.2,
    ("kaizen-r2", "canary"): 0.4,
}


def _seed(factory: Any, root: Path) -> None:
    ids = registry_history(factory, root)
    now = datetime.now(UTC)
    with factory() as s:
        for (name, to_state), days in MOVES.items():
            s.execute(
                update(AdapterTransition)
                .where(AdapterTransition.adapter_id == ids[name])
                .where(AdapterTransition.to_state == to_state)
                .values(at=now - timedelta(days=days))
            )
        s.execute(update(RolloutState).values(canary_started_at=now - timedelta(days=0.4)))
        s.commit()
        for adapter, days, n, shown, accepted, verdicts in PLAN:
            at = now - timedelta(days=days, minutes=5)
            for i in range(n):
                cid = f"{adapter}-{days}-{i}"
                completion(s, cid, adapter=adapter, at=at)
                if i < shown:
                    event(s, cid, "shown", at)
                if i < accepted:
                    event(s, cid, "accepted", at)
                if i < len(verdicts):
                    outcome(s, cid, verdicts[i], at=at + timedelta(minutes=1))


_CHARTS_JS = """() => Object.fromEntries(Object.entries(window.kaizenCharts).map(([k, u]) => [k, {
    series: u.series.slice(1).map((s) => s.label),
    days: u.data[0].length,
    values: u.data.slice(1).map((ys) => ys.filter((v) => v !== null)),
    canvas: [u.ctx.canvas.width, u.ctx.canvas.height],
}]))"""


@pytest.mark.timeout(300)
def test_dashboard_in_chromium(
    browser: Any,  # noqa: F811
    settings: Settings,
    session_factory: Any,
    tokens: dict[str, str],
    tmp_path: Path,
) -> None:
    _seed(session_factory, tmp_path / "adapters")
    app = create_app(settings, engine=FakeEngine(base_sha256=BASE_SHA))
    with live_server(app) as server:
        expected = httpx.get(
            f"{server.url}/v1/dashboard", headers={"Authorization": f"Bearer {tokens['ops']}"}
        ).json()
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{server.url}/dashboard")
        assert page.url.endswith("/dashboard/login")  # no session: the login form
        page.fill("#token", tokens["ops"])
        page.click("#login")
        page.wait_for_url(f"{server.url}/dashboard")
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        assert errors == []

        charts = page.evaluate(_CHARTS_JS)
        assert set(charts) == {"acceptance_rate", "ci_pass_rate"}
        for metric, want_points in (
            ("acceptance_rate", ACCEPTANCE_POINTS),
            ("ci_pass_rate", CI_POINTS),
        ):
            chart = charts[metric]
            assert chart["series"] == ["base model", "kaizen-r0", "kaizen-r1", "kaizen-r2"]
            assert chart["days"] == 7
            assert sum(len(v) for v in chart["values"]) == want_points, metric
            assert chart["canvas"][0] > 0 and chart["canvas"][1] > 0
            # The values drawn are the API's, series by series.
            assert chart["values"] == [
                [p[metric] for p in s["points"] if p[metric] is not None]
                for s in expected["series"]
            ]
            element = page.locator(f".chart[data-metric={metric}]")
            assert element.get_attribute("data-points") == str(want_points)
            assert element.get_attribute("data-events") == "5"
        # base model on day 6: 1 of 4 accepted; kaizen-r2 today: 2 of 2 passed
        assert charts["acceptance_rate"]["values"][0][0] == 0.25
        assert charts["ci_pass_rate"]["values"][3] == [1.0]

        kinds = page.locator("#events tr.event td:nth-child(2)").all_inner_texts()
        assert kinds == [
            "canary started",
            "promoted",
            "canary started",
            "rolled back",
            "canary started",
        ]
        steps = page.locator("#round-1 .funnel-step")
        assert [steps.nth(i).get_attribute("data-count") for i in range(5)] == [
            "80",
            "64",
            "30",
            "18",
            "18",
        ]
        widths = page.eval_on_selector_all("#round-1 .bar", "bs => bs.map(b => b.style.width)")
        assert widths == ["100%", "80%", "38%", "23%", "23%"]
        assert page.locator("#round-1 .gate-suite").count() == 3
        assert page.locator("#canary-action").inner_text() == "wait"
        assert page.locator("#canary-table .side-canary td").first.inner_text() == "4"
        assert (
            page.locator('[data-adapter="kaizen-r1"]').get_attribute("data-parent") == "kaizen-r0"
        )

        [cookie] = [c for c in context.cookies() if c["name"] == COOKIE]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert tokens["ops"] not in cookie["value"]
        assert page.evaluate("document.cookie") == ""  # out of scripts' reach
        assert tokens["ops"] not in page.url
        context.close()

        # An ide token: refused with a page saying why, and no session.
        ide = browser.new_context()
        page = ide.new_page()
        page.goto(f"{server.url}/dashboard/login")
        page.fill("#token", tokens["ide"])
        with page.expect_response(f"{server.url}/dashboard/login") as answer:
            page.click("#login")
        assert answer.value.status == 403
        assert "needs an ops token" in page.locator("#refused").inner_text()
        page.screenshot(path=str(tmp_path / "refused.png"), full_page=True)
        assert [c for c in ide.cookies() if c["name"] == COOKIE] == []
        assert page.goto(f"{server.url}/dashboard").url.endswith("/dashboard/login")
        direct = ide.request.get(
            f"{server.url}/v1/dashboard", headers={"Authorization": f"Bearer {tokens['ide']}"}
        )
        assert direct.status == 403
        ide.close()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


# -- the browser set-up itself (tests/utils/browser.py), without touching the system ---------


def test_setup_installs_chromium_with_apt_get_when_missing(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from tests.utils import browser as setup

    target = tmp_path / "chromium"
    calls: list[tuple[str, ...]] = []

    def apt(*args: str) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        if args[0] == "install" and ("update",) in calls:
            target.write_text("#!/bin/sh\n")  # installed, once the package lists exist
            return subprocess.CompletedProcess(args, 0, "", "")
        return subprocess.CompletedProcess(args, 100 if args[0] == "install" else 0, "", "E: x")

    monkeypatch.setattr(setup, "CHROMIUM", target)
    monkeypatch.setattr(setup, "_apt", apt)
    monkeypatch.setattr(setup.os, "geteuid", lambda: 0)
    monkeypatch.setattr(setup.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert setup.ensure_chromium() == target
    assert calls == [
        ("install", "-y", "--no-install-recommends", "chromium"),
        ("update",),
        ("install", "-y", "--no-install-recommends", "chromium"),
    ]


def test_setup_skips_saying_why(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from tests.utils import browser as setup

    monkeypatch.setattr(setup, "CHROMIUM", tmp_path / "chromium")
    monkeypatch.setattr(setup.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        setup.ensure_chromium()
    monkeypatch.setattr(setup.os, "geteuid", lambda: 0)
    monkeypatch.setattr(setup.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(
        setup,
        "_apt",
        lambda *a: subprocess.CompletedProcess(a, 100, "", "E: Unable to locate package chromium"),
    )
    with pytest.raises(pytest.skip.Exception, match="Unable to locate package chromium"):
        setup.ensure_chromium()
