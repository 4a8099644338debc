"""Training in several processes (trainer.launch): one process is train_adapter in this process,
no subprocess; two are a real `accelerate launch` of two CPU processes over gloo on the tiny
model, whose adapter, manifest and result are what train_adapter gives; a failed launch raises
with the processes' output."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import trainer.launch as launch
import trainer.train
from server.engine.lora import base_fingerprint, check_adapter
from tests.trainer.test_train import PAIRS
from tests.trainer.test_train import _config as tiny_config
from tests.trainer.test_train import _one_thread as _one_thread  # noqa: F401 (autouse fixture)
from tests.trainer.test_train import model_dir as model_dir  # noqa: F401 (fixture)
from tests.utils.tiny_model import build_random_lora
from trainer.config import TrainConfig
from trainer.launch import LaunchError, train_adapter_launched
from trainer.pairs import Pair
from trainer.train import TrainResult, train_adapter


def _config(**overrides: Any) -> TrainConfig:
    """The tiny recipe of test_train, two steps."""
    return tiny_config(**{"max_steps": 2, **overrides})


def _no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a subprocess was started: {args!r}")

    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)


@pytest.mark.parametrize("num_processes", [1, 0])
def test_one_process_calls_train_adapter_here(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, num_processes: int
) -> None:
    _no_subprocess(monkeypatch)
    calls: list[dict[str, Any]] = []
    sentinel = TrainResult(tmp_path / "adapter", 1, 0.1, 1.0, {}, ["p0"])

    def fake_train_adapter(**kwargs: Any) -> TrainResult:
        calls.append(kwargs)
        return sentinel

    monkeypatch.setattr(trainer.train, "train_adapter", fake_train_adapter)
    arguments: dict[str, Any] = {
        "base_model_dir": tmp_path / "model",
        "pairs": PAIRS[:2],
        "config": _config(),
        "parent_adapter": None,
        "output_dir": tmp_path / "out",
        "progress": False,
        "resume": False,
        "extra_manifest": {"round_id": 3},
    }
    assert train_adapter_launched(num_processes=num_processes, **arguments) is sentinel
    assert calls == [arguments]  # exactly train_adapter's arguments, passed through
    assert not (tmp_path / "out").exists()  # no arguments file either


def test_arguments_and_result_round_trip(tmp_path: Path) -> None:
    arguments: dict[str, Any] = {
        "base_model_dir": tmp_path / "model",
        "pairs": [*PAIRS[:2], Pair("fim", "<p>x", "1\n", "2\n", "fix", "x", "\n", "ctx")],
        "config": _config(lora_target_modules=["q_proj", "v_proj"], bf16=False),
        "parent_adapter": tmp_path / "parent",
        "output_dir": tmp_path / "out",
        "progress": True,
        "resume": True,
        "extra_manifest": {"round_id": 3, "funnel": {"pairs": 2}},
    }
    encoded = json.loads(json.dumps(launch._encode_arguments(arguments)))
    assert launch._decode_arguments(encoded) == arguments

    for result in (
        TrainResult(
            adapter_dir=tmp_path / "adapter",
            steps=2,
            duration_s=1.5,
            tokens_per_s=100.0,
            metrics={"loss": 0.5, "rewards/chosen": float("nan")},
            trained_pair_ids=["p0", "p1"],
            log_history=[{"loss": 0.5, "step": 1}],
        ),
        TrainResult(None, 1, 0.2, 3.0, {}, ["p0"], stopped_reason="non-finite loss=nan"),
    ):
        back = TrainResult.from_json(json.loads(json.dumps(result.to_json())))
        assert back.adapter_dir == result.adapter_dir and back.steps == result.steps
        assert back.stopped_reason == result.stopped_reason
        assert back.trained_pair_ids == result.trained_pair_ids
        assert back.log_history == result.log_history
        assert back.metrics.keys() == result.metrics.keys()
        assert all(
            math.isnan(v) if math.isnan(result.metrics[k]) else v == result.metrics[k]
            for k, v in back.metrics.items()
        )


def test_a_batch_that_cannot_be_split_is_refused_before_launching(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_subprocess(monkeypatch)
    with pytest.raises(ValueError, match="cannot be split over 2 processes"):
        train_adapter_launched(
            num_processes=2,
            base_model_dir=tmp_path,
            pairs=PAIRS,
            config=_config(batch_size=3),
            output_dir=tmp_path / "out",
        )


@pytest.mark.distributed
def test_two_cpu_processes_train_an_adapter_train_adapter_accepts(
    model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "round"
    result = train_adapter_launched(
        num_processes=2,
        base_model_dir=model_dir,
        pairs=PAIRS,
        config=_config(),
        parent_adapter=None,
        output_dir=out,
        progress=False,
        resume=True,
        extra_manifest={"round_id": 7},
    )

    assert result.stopped_reason is None and result.steps == 2
    assert result.adapter_dir == out / "adapter"
    assert result.trained_pair_ids == [p.id for p in PAIRS]
    # batch_size is pairs per optimiser step whatever the processes: 2 steps of 4 of 16 pairs.
    assert result.log_history[-1]["epoch"] == 0.5
    assert not (out / "checkpoints").exists()
    # The result is the one the main process wrote, read back whole.
    written = json.loads((out / launch.RESULT_FILE).read_text())
    assert TrainResult.from_json(written) == result
    for name in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "nll"):
        assert math.isfinite(result.metrics[name]), name
    assert result.tokens_per_s > 0 and result.log_history[0]["num_tokens"] > 0

    # One adapter, written once, with train_adapter's manifest.
    assert {p.name for p in out.iterdir()} == {"adapter", launch.ARGS_FILE, launch.RESULT_FILE}
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert all(w.abs().sum() > 0 for k, w in weights.items() if ".lora_B." in k)
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["round_id"] == 7 and manifest["steps"] == 2
    assert manifest["pair_ids"] == [p.id for p in PAIRS] and manifest["dropped_pair_ids"] == []
    assert manifest["metrics"] == result.metrics
    assert manifest["base_model"]["sha256"] == base_fingerprint(model_dir)["sha256"]

    # The engine's checks and the next round's (train_adapter on it as the parent) accept it.
    sha = base_fingerprint(model_dir)["sha256"]
    assert check_adapter(result.adapter_dir, max_rank=16, base_sha256=sha) == 8
    child = train_adapter(
        base_model_dir=model_dir,
        pairs=PAIRS,
        config=_config(max_steps=1),
        parent_adapter=result.adapter_dir,
        output_dir=tmp_path / "next",
        progress=False,
    )
    assert child.stopped_reason is None and child.adapter_dir is not None


@pytest.mark.distributed
def test_two_cpu_processes_continue_a_parent_against_itself(
    model_dir: Path, tmp_path: Path
) -> None:
    parent = build_random_lora(model_dir, tmp_path / "parent", rank=8)
    result = train_adapter_launched(
        num_processes=2,
        base_model_dir=model_dir,
        pairs=PAIRS,
        config=_config(),
        parent_adapter=parent,
        output_dir=tmp_path / "round",
        progress=False,
    )
    # TRL's frozen "ref" copy of the parent is the reference in each process: zero rewards at
    # the first step, and the saved adapter is the trained one alone.
    first = result.log_history[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert result.adapter_dir is not None and not (result.adapter_dir / "ref").exists()
    before, after = (
        load_file(parent / "adapter_model.safetensors"),
        load_file(result.adapter_dir / "adapter_model.safetensors"),
    )
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["reference"] == "parent adapter"


@pytest.mark.distributed
def test_a_failed_launch_raises_with_the_processes_output(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LaunchError) as failed:
        train_adapter_launched(
            num_processes=2,
            base_model_dir=model_dir,
            pairs=PAIRS,
            config=_config(),
            parent_adapter=tmp_path / "no-such-adapter",
            output_dir=tmp_path / "round",
            progress=False,
        )
    message = str(failed.value)
    assert "accelerate launch exited with status 1" in message
    # torchrun's summary, at the end, names the exception of the process that failed first.
    root_cause = message[message.index("Root Cause") :]
    assert "FileNotFoundError" in root_cause and "no-such-adapter" in root_cause
    assert not (tmp_path / "round" / launch.RESULT_FILE).exists()


_TRAINER_SCRIPT = """
import json, sys
from pathlib import Path
from trainer.launch import _decode_arguments, train_adapter_launched
arguments = _decode_arguments(json.loads(Path(sys.argv[1]).read_text()))
train_adapter_launched(num_processes=2, **arguments)
"""


@pytest.mark.distributed
@pytest.mark.parametrize("killed", ["trainer", "launcher"])
def test_a_killed_launch_leaves_no_process_and_resumes_from_its_last_checkpoint(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, killed: str
) -> None:
    """SIGKILL the trainer that launched (its launcher gets SIGTERM and stops the workers) or
    the launcher itself (torchrun starts each worker in a session of its own; they die with
    it): nothing trains on. The next launch resumes; its main process alone prepares the
    checkpoints folder (removing what the kill left half written), the other uses what it
    kept."""
    out = tmp_path / "round"
    config = _config(max_steps=40, save_steps=2, learning_rate=1e-4)
    arguments = {
        "base_model_dir": model_dir,
        "pairs": PAIRS,
        "config": config,
        "parent_adapter": None,
        "output_dir": out,
        "progress": False,
        "resume": True,
        "extra_manifest": None,
    }
    args_file = tmp_path / "trainer-args.json"
    args_file.write_text(json.dumps(launch._encode_arguments(arguments)))
    trainer_process = subprocess.Popen(
        [sys.executable, "-c", _TRAINER_SCRIPT, str(args_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not any(out.glob("checkpoints/checkpoint-*/trainer_state.json")):
            assert trainer_process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        (launcher,) = _children(trainer_process.pid)
        workers = _children(launcher)
        assert len(workers) == 2
        os.kill(launcher if killed == "launcher" else trainer_process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in (launcher, *workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in (launcher, *workers))
    finally:
        trainer_process.kill()
        trainer_process.wait()
    assert not (out / "adapter").exists()
    kept = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert kept and all(int(name.split("-")[1]) < 40 for name in kept), kept

    with caplog.at_level(logging.INFO, logger="trainer.launch"):
        resumed = train_adapter_launched(num_processes=2, **arguments)
    assert f"resume_from={out / 'checkpoints'}/checkpoint-" in caplog.text
    assert resumed.stopped_reason is None and resumed.steps == 40
    assert [e["step"] for e in resumed.log_history if "loss" in e] == list(range(1, 41))
    assert resumed.adapter_dir == out / "adapter" and not (out / "checkpoints").exists()


def _children(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has exited
