"""`kaizen train` (dry run and a real round), `kaizen rounds` and `kaizen adapters` on the tiny
model, through the command line and the settings, as an operator runs them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kaizen.cli import app
from server.config import get_settings
from server.store.db import make_engine, make_session_factory, upgrade
from tests.trainer.test_round import add_records
from tests.utils.tiny_model import build_tiny_model


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    model = build_tiny_model(tmp_path / "model")
    monkeypatch.setenv("KAIZEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAIZEN_MODEL", str(model))
    monkeypatch.delenv("KAIZEN_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    url = get_settings().database_url
    upgrade(url)
    db = make_engine(url)
    with make_session_factory(db)() as session:
        add_records(session)
    db.dispose()
    yield tmp_path / "home"
    get_settings.cache_clear()


def test_dry_run_then_a_round_then_the_listings(home: Path) -> None:
    runner = CliRunner()
    dry = runner.invoke(app, ["train", "--dry-run", "--resample", "0", "--no-select"])
    assert dry.exit_code == 0, dry.output
    assert "round (dry run): dry_run" in dry.output
    assert "pairs: 6" in dry.output and "outcome_records: 12" in dry.output
    assert not (home / "rounds").exists()

    # --no-gate: the gate (a vLLM engine and HumanEval) is tested in test_gate.py.
    real = runner.invoke(
        app, ["train", "--resample", "0", "--no-select", "--max-steps", "1", "--no-gate"]
    )
    assert real.exit_code == 0, real.output
    assert "round 1: succeeded" in real.output
    assert "candidate adapter: kaizen-r1-" in real.output
    assert (home / "rounds" / "round-00001" / "train" / "adapter" / "manifest.json").is_file()

    rounds = runner.invoke(app, ["rounds"])
    assert rounds.exit_code == 0 and "succeeded" in rounds.output
    listing = runner.invoke(app, ["adapters", "list"])
    assert listing.exit_code == 0 and "candidate" in listing.output
    refused = runner.invoke(app, ["adapters", "promote", "kaizen-r1-x", "--to", "active"])
    assert refused.exit_code == 1 and "no adapter named" in refused.output
