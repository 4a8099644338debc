"""The error-rate benchmark runs end to end on the real suites' task ids and writes its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.gate_power import main, suite_ids


def test_the_suites_are_the_gates_own_task_lists() -> None:
    ids = suite_ids({"mbpp_dev": -1, "humaneval": -1, "humaneval_fim": -1, "recorded": 5})
    assert {k: len(v) for k, v in ids.items()} == {
        "mbpp_dev": 60,
        "humaneval": 164,
        "humaneval_fim": 164,
        "recorded": 5,
    }
    assert ids["humaneval_fim"][0] == ids["humaneval"][0] + "/line"


def test_it_prints_and_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gate_power.json"
    args = ["--sims", "40", "--canary-sims", "20", "--recorded", "12", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "FA/10" in printed and "promoted" in printed
    data = json.loads(out.read_text())
    assert data["gate"]["sizes"]["recorded"] == 12
    row = data["gate"]["by_tau"]["1"]
    assert set(row) == {
        "false_approval_per_round",
        "false_approval_10_rounds",
        "power_+2",
        "power_+5",
        "power_+8",
    }
    assert set(data["canary"]["rates"]) == {"-5", "+0", "+5"}
    assert data["gate"]["config"]["samples"] == 16
