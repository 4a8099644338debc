"""The HTTP client against the fake server, the spool, and delivery with resending."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
from kaizen_client.client import KaizenClient, KaizenRejected, KaizenUnavailable
from kaizen_client.spool import Spool, deliver, spool_dir

from tests.plugins.fake_kaizen import FakeKaizen, ledger_entry, report_problems, unused_url


def report(run_id: str, status: str = "passed") -> dict[str, object]:
    return {
        "run_id": run_id,
        "repository": "github.com/acme/app",
        "commit": "9fceb02",
        "branch": "main",
        "status": status,
        "started_at": "2026-11-22T10:00:00+00:00",
        "finished_at": "2026-11-22T10:01:00+00:00",
        "tests": [],
        "log_tail": "",
        "completions": [],
    }


# --- client ----------------------------------------------------------------------------------


def test_fetch_ledger_for_the_repository(kaizen_server: FakeKaizen) -> None:
    kaizen_server.ledger = [
        ledger_entry("cmpl-a", "x", repository="github.com/acme/app"),
        ledger_entry("cmpl-b", "y", repository="github.com/other/app"),
        {**ledger_entry("cmpl-c", "z", repository="github.com/acme/app"), "bogus": None},
    ]
    client = KaizenClient(kaizen_server.url + "/v1/", kaizen_server.token)
    entries = client.fetch_ledger("github.com/acme/app")
    assert sorted(e.completion_id for e in entries) == ["cmpl-a", "cmpl-c"]
    method, path, headers = kaizen_server.requests[-1]
    assert (method, path) == ("GET", "/v1/ledger?repository=github.com%2Facme%2Fapp")
    assert headers["Authorization"] == f"Bearer {kaizen_server.token}"


def test_post_outcome_and_duplicates(kaizen_server: FakeKaizen) -> None:
    client = KaizenClient(kaizen_server.url, kaizen_server.token)
    assert client.post_outcome(report("github:1:1"))["duplicate"] is False
    assert client.post_outcome(report("github:1:1"))["duplicate"] is True
    assert kaizen_server.run_ids == ["github:1:1"]


def test_unreachable_server_is_unavailable() -> None:
    client = KaizenClient(unused_url(), "kz_secret_token")
    with pytest.raises(KaizenUnavailable) as caught:
        client.fetch_ledger("github.com/acme/app")
    assert "kz_secret_token" not in str(caught.value)
    assert "kz_secret_token" not in repr(client)


def test_timeout_bounds_the_whole_request(kaizen_server: FakeKaizen) -> None:
    kaizen_server.delay = 2.0
    client = KaizenClient(kaizen_server.url, kaizen_server.token, timeout=0.3)
    started = time.monotonic()
    # The whole-request limit and the socket's own time-out race: either message is right.
    with pytest.raises(KaizenUnavailable, match="did not answer within|timed out"):
        client.post_outcome(report("r1"))
    assert time.monotonic() - started < 1.5


def test_5xx_is_unavailable_and_4xx_is_rejected(kaizen_server: FakeKaizen) -> None:
    client = KaizenClient(kaizen_server.url, kaizen_server.token)
    kaizen_server.outcome_status = 503
    with pytest.raises(KaizenUnavailable, match="503"):
        client.post_outcome(report("r1"))
    kaizen_server.outcome_status = None
    with pytest.raises(KaizenRejected) as caught:
        KaizenClient(kaizen_server.url, "kz_wrong_token").post_outcome(report("r1"))
    assert caught.value.status == 401 and not caught.value.retryable
    assert "missing or invalid token" in str(caught.value)
    assert "kz_wrong_token" not in str(caught.value)
    with pytest.raises(KaizenRejected, match="422"):
        client.post_outcome({**report("r2"), "extra": 1})


def test_the_token_is_never_logged(
    kaizen_server: FakeKaizen, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = KaizenClient(kaizen_server.url, kaizen_server.token)
    client.post_outcome(report("r1"))
    with pytest.raises(KaizenUnavailable):
        KaizenClient(unused_url(), kaizen_server.token).post_outcome(report("r2"))
    assert kaizen_server.token not in caplog.text


def test_bad_urls_are_refused() -> None:
    with pytest.raises(ValueError):
        KaizenClient("kaizen.example.com")


# --- spool -----------------------------------------------------------------------------------


def test_spool_keeps_order_and_the_first_report_of_a_run(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first = spool.save(report("github:1:1"))
    second = spool.save(report("gitlab:7"))
    os.utime(first, (time.time() - 60, time.time() - 60))
    assert spool.pending() == [first, second]
    assert spool.save(report("github:1:1", status="failed")) == first
    assert json.loads(first.read_text())["status"] == "passed"
    assert first.name.startswith("github_1_1")


def test_flush_sends_oldest_first_and_deletes(tmp_path: Path, kaizen_server: FakeKaizen) -> None:
    spool = Spool(tmp_path / "spool")
    for age, run_id in ((30, "old"), (20, "middle"), (10, "new")):
        path = spool.save(report(run_id))
        os.utime(path, (time.time() - age, time.time() - age))
    result = spool.flush(KaizenClient(kaizen_server.url, kaizen_server.token))
    assert (result.sent, result.rejected, result.remaining) == (3, 0, 0)
    assert kaizen_server.run_ids == ["old", "middle", "new"]
    assert spool.pending() == []


def test_flush_stops_when_the_server_is_down(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.save(report("a"))
    spool.save(report("b"))
    result = spool.flush(KaizenClient(unused_url(), "t"))
    assert result.sent == 0 and result.remaining == 2 and result.unavailable
    assert len(spool.pending()) == 2


def test_flush_moves_refused_reports_aside(tmp_path: Path, kaizen_server: FakeKaizen) -> None:
    spool = Spool(tmp_path / "spool")
    spool.save(report("bad", status="exploded"))  # the server answers 422
    (spool.directory / "garbage.json").write_text("{oops")
    spool.save(report("good"))
    warnings: list[str] = []
    result = spool.flush(KaizenClient(kaizen_server.url, kaizen_server.token), warn=warnings.append)
    assert (result.sent, result.rejected) == (1, 2)
    assert kaizen_server.run_ids == ["good"]
    assert sorted(p.name for p in spool.rejected_directory.iterdir()) == [
        "bad.json",
        "garbage.json",
    ]
    assert len(warnings) == 2 and any("422" in w for w in warnings)


@pytest.mark.parametrize("status", [409, 429])
def test_flush_keeps_reports_answered_409_or_429(
    tmp_path: Path, kaizen_server: FakeKaizen, status: int
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.save(report("r1"))
    kaizen_server.outcome_status = status
    result = spool.flush(KaizenClient(kaizen_server.url, kaizen_server.token))
    assert result.sent == 0 and result.rejected == 0
    assert len(spool.pending()) == 1
    assert not spool.rejected_directory.exists()


def test_deliver_spools_when_down_and_resends_first_next_time(
    tmp_path: Path, kaizen_server: FakeKaizen
) -> None:
    spool = Spool(tmp_path / "spool")
    down = deliver(KaizenClient(unused_url(), "t"), report("run-1"), spool)
    assert not down.sent and down.spooled_to is not None and down.spooled_to.exists()
    up = deliver(KaizenClient(kaizen_server.url, kaizen_server.token), report("run-2"), spool)
    assert up.sent and up.resent == 1
    assert kaizen_server.run_ids == ["run-1", "run-2"]
    assert spool.pending() == []


def test_deliver_keeps_a_refused_report(tmp_path: Path, kaizen_server: FakeKaizen) -> None:
    spool = Spool(tmp_path / "spool")
    warnings: list[str] = []
    result = deliver(
        KaizenClient(kaizen_server.url, "kz_wrong"), report("r"), spool, warn=warnings.append
    )
    assert not result.sent and result.rejected_to is not None and result.rejected_to.exists()
    assert spool.pending() == [] and len(warnings) == 1


def test_deliver_respects_its_budget(tmp_path: Path, kaizen_server: FakeKaizen) -> None:
    kaizen_server.delay = 2.0
    started = time.monotonic()
    result = deliver(
        KaizenClient(kaizen_server.url, kaizen_server.token),
        report("r"),
        Spool(tmp_path),
        budget=0.5,
    )
    assert time.monotonic() - started < 1.5
    assert not result.sent and result.spooled_to is not None


def test_spool_dir_default_and_override(tmp_path: Path) -> None:
    assert spool_dir(tmp_path, {}) == tmp_path / ".kaizen" / "spool"
    assert spool_dir(tmp_path, {"KAIZEN_SPOOL_DIR": "/cache/kaizen"}) == Path("/cache/kaizen")


def test_fake_server_checks_like_the_real_one() -> None:
    assert report_problems(report("r")) == []
    assert report_problems({**report("r"), "extra": 1})


def test_flush_warns_of_refused_completions(tmp_path: Path, kaizen_server: FakeKaizen) -> None:
    spool = Spool(tmp_path / "spool")
    waiting = report("github:9:1")
    waiting["completions"] = [
        {
            "completion_id": "cmpl-x",
            "choice_index": 0,
            "file_path": "src/calc.py",
            "final_text": "return a + b",
            "status": "passed",
            "tests": [],
        }
    ]
    spool.save(waiting)
    kaizen_server.refused = {"cmpl-x": "repository_not_in_scope"}
    warnings: list[str] = []
    result = spool.flush(KaizenClient(kaizen_server.url, kaizen_server.token), warn=warnings.append)
    assert result.sent == 1 and not spool.pending()
    [line] = warnings
    assert "refused 1 completion (cmpl-x)" in line and line.endswith("[spooled run github:9:1]")
