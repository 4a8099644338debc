"""Outcome-gated GRPO: the reward rule (pure numbers), the sealed reward on real sandbox runs with
a scripted judge, a GRPO step on the tiny model that moves the LoRA and not the base, and the
``kaizen train --method grpo`` wiring."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from server.engine.lora import base_fingerprint
from tests.trainer.test_cli import home  # noqa: F401 - the fixture: settings on the tiny model
from tests.utils.tiny_model import build_tiny_model
from trainer.config import TrainConfig
from trainer.judge import JudgeItem, JudgeVerdict
from trainer.rewards import Components, RewardRule, cut_at_stops, format_ok
from trainer.tasks import Task

ADD = Task("t/add", "mbpp", "def add(a, b):\n", "\n", "assert add(2, 3) == 5\n")
NEG = Task("t/neg", "mbpp", "def neg(a):\n", "\n", "assert neg(4) == -4\n")


class ScriptedJudge:
    """A judge whose score is a fixed function of the completion; it records what it was shown."""

    name = "scripted"
    prompt_version = "test-v1"

    def __init__(self, score: Any = lambda text: 1.0) -> None:
        self.score = score
        self.seen: list[JudgeItem] = []

    def judge(self, items: Sequence[JudgeItem]) -> list[JudgeVerdict]:
        self.seen.extend(items)
        verdicts = []
        for item in items:
            value = self.score(item.completion)  # in quarters: four yes/no answers
            answers = {f"q{i}": i < round(value * 4) for i in range(4)}
            verdicts.append(JudgeVerdict(answers=answers, raw=""))
        return verdicts


# -- the rule ---------------------------------------------------------------------------------


def test_the_gated_rule_pays_the_process_only_with_a_passing_outcome() -> None:
    rule = RewardRule()  # gated, weights 1
    assert rule.reward(Components(format=True, passed=True, process=0.75)) == 2.75
    # A failing completion the judge loves earns only its format: the judge cannot lift it.
    assert rule.reward(Components(format=True, passed=False, process=1.0)) == 1.0
    assert rule.reward(Components(format=False, passed=False, process=1.0)) == 0.0
    # A pass the judge gave no parseable answer on keeps format + outcome.
    assert rule.reward(Components(format=True, passed=True, process=None)) == 2.0
    # So any pass outranks any fail, whatever the judge says.
    best_fail = rule.reward(Components(format=True, passed=False, process=1.0))
    worst_pass = rule.reward(Components(format=True, passed=True, process=0.0))
    assert worst_pass > best_fail


def test_the_ungated_rule_pays_the_process_regardless_and_lets_a_fail_outrank_a_pass() -> None:
    rule = RewardRule(gated=False)
    assert rule.reward(Components(format=True, passed=False, process=1.0)) == 2.0
    assert rule.reward(Components(format=True, passed=True, process=0.0)) == 2.0
    weighted = RewardRule(gated=False, format_weight=0.5, outcome_weight=1.0, process_weight=2.0)
    loved_fail = weighted.reward(Components(format=True, passed=False, process=1.0))
    unloved_pass = weighted.reward(Components(format=True, passed=True, process=0.0))
    assert loved_fail == 2.5 > unloved_pass == 1.5  # the hack the gate is there to prevent


def test_which_completions_the_judge_is_asked_about() -> None:
    assert RewardRule().needs_process(True) and not RewardRule().needs_process(False)
    assert RewardRule(gated=False).needs_process(False)
    assert not RewardRule(process_weight=0.0).needs_process(True)  # outcome-only GRPO


def test_the_rule_refuses_what_cannot_be_a_reward() -> None:
    with pytest.raises(ValueError, match="process_weight"):
        RewardRule(process_weight=-1.0)
    with pytest.raises(ValueError, match="process"):
        Components(format=True, passed=True, process=1.5)


def test_format_needs_an_ending_and_a_program_that_parses() -> None:
    assert format_ok("def f():\n    return 1\n", ended=True)
    assert not format_ok("def f():\n    return 1\n", ended=False)  # cut by the length limit
    assert not format_ok("def f():\n    return (1\n", ended=True)
    assert not format_ok("x = 1\x00\n", ended=True)
    assert cut_at_stops("    return a\n\nprint(1)", ["\n\n"]) == ("    return a", True)
    assert cut_at_stops("    return a", ["\n\n", "\nprint("]) == ("    return a", False)
    assert cut_at_stops("a\nprint(x)\n\nz", ["\n\n", "\nprint("]) == ("a", True)  # earliest


# -- the sealed reward, on real sandbox runs ---------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reward(model_dir: Path, judge: ScriptedJudge, rule: RewardRule) -> Any:
    from transformers import AutoTokenizer

    from trainer.grpo import SealedReward, _prepare
    from trainer.sandbox import Sandbox

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepared = {t.task_id: _prepare(t, tokenizer) for t in (ADD, NEG)}
    return SealedReward(prepared, sandbox=Sandbox(workers=2), judge=judge, rule=rule)


COMPLETIONS = [
    "    return a + b\n\nprint('after the block')",  # passes (cut at the blank line)
    "    return a - b\n\n",  # fails its test
    "    return -a\n\n",  # passes
    "    return (a\n\n",  # does not parse
]
TASK_IDS = ["t/add", "t/add", "t/neg", "t/neg"]
IDS = [[1, 2, 3]] * 4  # no end token: the stop string alone says each ended


def test_the_gated_reward_runs_every_completion_and_shows_only_passes_to_the_judge(
    model_dir: Path,
) -> None:
    judge = ScriptedJudge(lambda text: 0.5)
    reward = _reward(model_dir, judge, RewardRule())
    logged: dict[str, float] = {}
    rewards = reward(
        prompts=[""] * 4,
        completions=COMPLETIONS,
        completion_ids=IDS,
        task_id=TASK_IDS,
        log_metric=logged.__setitem__,
    )
    assert rewards == [2.5, 1.0, 2.5, 0.0]
    assert [item.completion for item in judge.seen] == ["    return a + b", "    return -a"]
    assert judge.seen[0].prefix == ADD.prompt and judge.seen[0].suffix == ADD.suffix
    assert logged["outcome/pass_rate"] == 0.5 and logged["format/rate"] == 0.75
    assert logged["process/judged"] == 2 and logged["process/mean"] == 0.5


def test_the_ungated_reward_pays_the_judge_on_failures_too(model_dir: Path) -> None:
    judge = ScriptedJudge(lambda text: 1.0 if "-" in text else 0.0)
    reward = _reward(model_dir, judge, RewardRule(gated=False))
    rewards = reward(
        prompts=[""] * 4, completions=COMPLETIONS, completion_ids=IDS, task_id=TASK_IDS
    )
    # The wrong `a - b` now earns as much as the right `-a`, and more than the right `a + b`.
    assert rewards == [2.0, 2.0, 3.0, 0.0]
    assert len(judge.seen) == 4


def test_a_completion_cut_by_the_length_limit_earns_no_format(model_dir: Path) -> None:
    reward = _reward(model_dir, ScriptedJudge(), RewardRule(process_weight=0.0))
    # Correct code, but neither a stop string nor an end token: the length limit cut it.
    assert reward(
        prompts=[""], completions=["    return a + b"], completion_ids=[[1]], task_id=["t/add"]
    ) == [1.0]
    end = next(iter(reward.prepared["t/add"].end_token_ids))
    assert reward(
        prompts=[""], completions=["    return a + b"], completion_ids=[[1, end]], task_id=["t/add"]
    ) == [2.0]


def test_a_process_weight_without_a_judge_is_refused(model_dir: Path) -> None:
    from trainer.grpo import SealedReward

    with pytest.raises(ValueError, match="needs a judge"):
        SealedReward({}, sandbox=None, judge=None, rule=RewardRule())  # type: ignore[arg-type]


# -- a GRPO step on the tiny model ------------------------------------------------------------


def _grpo_config(**overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "method": "grpo",
        "max_steps": 2,
        "warmup_steps": 0,
        "learning_rate": 1e-2,
        "lora_r": 8,
        "lora_alpha": 16,
        "max_length": 128,
        "gradient_checkpointing": False,
        "save_steps": 100,
        "grpo_num_generations": 4,
        "grpo_tasks_per_step": 1,
        "grpo_max_completion_length": 12,
        "grpo_temperature": 1.0,
        "grpo_gated": False,  # a random model never passes: only the ungated rule varies
    }
    values.update(overrides)
    return TrainConfig(**values)


def test_a_grpo_step_moves_the_lora_and_not_the_base(model_dir: Path, tmp_path: Path) -> None:
    from trainer.grpo import train_grpo_adapter
    from trainer.sandbox import Sandbox

    base_before = load_file(model_dir / "model.safetensors")
    # A score that differs between completions gives the group an advantage to follow.
    judge = ScriptedJudge(lambda text: (len(text) % 5) / 4)
    result = train_grpo_adapter(
        base_model_dir=model_dir,
        tasks=[ADD, NEG],
        config=_grpo_config(),
        judge=judge,
        output_dir=tmp_path,
        sandbox=Sandbox(workers=2),
        progress=False,
    )
    assert result.stopped_reason is None and result.steps == 2 and result.method == "grpo"
    assert result.adapter_dir == tmp_path / "adapter" and judge.seen
    assert sorted(result.trained_task_ids) == ["t/add", "t/neg"]
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert any(w.abs().sum() > 0 for k, w in weights.items() if ".lora_B." in k)  # B starts at 0
    base_after = load_file(model_dir / "model.safetensors")
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    assert not (tmp_path / "checkpoints").exists()

    # The same manifest fields as a DPO adapter, with the method and the reward rule.
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["method"] == "grpo" and manifest["config"]["method"] == "grpo"
    assert {"base_model", "parent_adapter", "pair_ids", "config", "lora", "reference"} <= set(
        manifest
    )
    assert len(manifest["base_model"]["sha256"]) == 64 and manifest["lora"]["r"] == 8
    assert manifest["reward"]["rule"]["gated"] is False
    assert manifest["reward"]["judge"] == {"name": "scripted", "prompt_version": "test-v1"}
    assert sorted(manifest["task_ids"]) == ["t/add", "t/neg"] and manifest["steps"] == 2
    logged = [h for h in result.log_history if "reward" in h]
    assert len(logged) == 2 and all("outcome/pass_rate" in h for h in logged)

    # The engine's servability check accepts it as it accepts a DPO adapter.
    from server.engine.lora import check_adapter

    sha = base_fingerprint(model_dir)["sha256"]
    assert check_adapter(result.adapter_dir, max_rank=16, base_sha256=sha) == 8


def test_grpo_continues_a_parent_adapter_against_a_frozen_copy_of_it(
    model_dir: Path, tmp_path: Path
) -> None:
    from tests.utils.tiny_model import build_random_lora
    from trainer.grpo import train_grpo_adapter
    from trainer.sandbox import Sandbox

    parent = build_random_lora(model_dir, tmp_path / "parent", rank=8)
    before = load_file(parent / "adapter_model.safetensors")
    result = train_grpo_adapter(
        base_model_dir=model_dir,
        tasks=[ADD, NEG],
        config=_grpo_config(max_steps=1, grpo_beta=0.1),  # KL towards the parent
        judge=ScriptedJudge(lambda text: (len(text) % 5) / 4),
        parent_adapter=parent,
        output_dir=tmp_path / "child",
        sandbox=Sandbox(workers=2),
        progress=False,
    )
    assert result.adapter_dir is not None, result.stopped_reason
    after = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert set(after) == set(before)  # the trained adapter only, not TRL's "ref" copy
    assert any(not torch.equal(before[k], after[k]) for k in before)
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["parent_adapter"]["dir"] == str(parent.resolve())
    assert manifest["reference"] == "parent adapter"
    assert any("kl" in h for h in result.log_history)


def test_an_interrupted_grpo_run_resumes_from_its_last_checkpoint(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    import logging

    from tests.utils.tiny_model import build_random_lora
    from trainer.grpo import KaizenGRPOTrainer, train_grpo_adapter
    from trainer.sandbox import Sandbox

    # With a parent and a KL term the checkpoints also hold TRL's frozen "ref" adapter.
    parent = build_random_lora(model_dir, tmp_path / "parent", rank=8)
    config = _grpo_config(max_steps=3, save_steps=1, grpo_beta=0.1)
    original = KaizenGRPOTrainer.training_step

    def interrupted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    def run() -> Any:
        return train_grpo_adapter(
            base_model_dir=model_dir,
            tasks=[ADD, NEG],
            config=config,
            judge=ScriptedJudge(lambda text: (len(text) % 5) / 4),
            parent_adapter=parent,
            output_dir=tmp_path / "run",
            sandbox=Sandbox(workers=2),
            progress=False,
        )

    with monkeypatch.context() as patch:
        patch.setattr(KaizenGRPOTrainer, "training_step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run()
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert checkpoint.is_dir() and not (tmp_path / "run" / "adapter").exists()
    with caplog.at_level(logging.INFO, logger="trainer.grpo"):
        resumed = run()
    assert f"resume_from={checkpoint}" in caplog.text
    assert resumed.steps == 3 and resumed.adapter_dir is not None
    assert [e["step"] for e in resumed.log_history if "reward" in e] == [1, 2, 3]


# -- a GRPO round: tasks -> train -> register, like a DPO round -------------------------------


def test_a_grpo_round_trains_on_tasks_and_registers_a_candidate_like_a_dpo_one(
    session_factory: Any, model_dir: Path, tmp_path: Path
) -> None:
    from server.store import registry
    from trainer.round import RoundOptions, run_round

    config = _grpo_config(max_steps=1, max_length=1024, grpo_max_tasks=2, grpo_gated=True)
    dry = run_round(
        session_factory=session_factory,
        base_model_dir=model_dir,
        rounds_dir=tmp_path / "rounds",
        config=config,
        options=RoundOptions(n_resample=0),
        progress=False,
        dry_run=True,
    )
    assert dry.status == "dry_run" and dry.funnel["tasks"] == {"suite": "mbpp_train", "tasks": 2}
    assert "train" not in dry.durations and "pairs" not in dry.durations

    report = run_round(
        session_factory=session_factory,
        base_model_dir=model_dir,
        rounds_dir=tmp_path / "rounds",
        config=config,  # the tiny model itself is the judge (grpo_judge_model empty)
        options=RoundOptions(n_resample=0),
        progress=False,
    )
    assert report.status == "succeeded", report.error
    assert report.funnel["trained_tasks"] == 2 and report.funnel["trained_pairs"] == 0
    assert {"tasks", "train", "register"} <= set(report.durations)
    assert "pairs" not in report.durations and "selection" not in report.durations
    with session_factory() as session:
        adapter = registry.get_adapter(session=session, name=report.adapter_name or "")
        assert adapter is not None and adapter.state == "candidate"
        assert adapter.manifest["method"] == "grpo" and adapter.manifest["record_ids"] == []
        assert adapter.manifest["round_id"] == report.round_id
        assert adapter.manifest["reward"]["judge"]["name"] == model_dir.name


def test_a_grpo_round_refuses_a_held_out_suite() -> None:
    from trainer.stages import grpo_tasks

    with pytest.raises(ValueError, match="held out"):
        grpo_tasks(_grpo_config(grpo_suite="mbpp_dev"))
    assert len(grpo_tasks(_grpo_config(grpo_max_tasks=3))) == 3


# -- kaizen train --method grpo ---------------------------------------------------------------


def test_method_options_set_the_grpo_recipe_and_refuse_what_does_not_apply() -> None:
    from trainer.cli import method_options

    assert method_options("dpo") == {}
    assert method_options("grpo") == {"method": "grpo", "grpo_gated": True}
    assert method_options("grpo", ungated=True, judge_model="/models/judge") == {
        "method": "grpo",
        "grpo_gated": False,
        "grpo_judge_model": "/models/judge",
    }
    TrainConfig(**method_options("grpo", ungated=True))  # a valid recipe
    with pytest.raises(ValueError, match="'dpo' or 'grpo'"):
        method_options("ppo")
    with pytest.raises(ValueError, match="--ungated apply to --method grpo only"):
        method_options("dpo", ungated=True)
    with pytest.raises(ValueError, match="--judge-model apply to --method grpo only"):
        method_options("dpo", judge_model="/models/judge")
    with pytest.raises(ValueError, match="--watch"):
        method_options("grpo", watch=True)
    with pytest.raises(ValueError, match="--resample and --select/--no-select shape the pairs"):
        method_options("grpo", resample=0, select=False)


def test_kaizen_train_refuses_bad_method_combinations_before_it_starts() -> None:
    from typer.testing import CliRunner

    from kaizen.cli import app

    runner = CliRunner()
    for argv, message in [
        (["train", "--ungated"], "--ungated apply to --method grpo only"),
        (["train", "--method", "grpo", "--watch"], "--watch runs DPO rounds"),
        (["train", "--method", "grpo", "--no-select"], "--select/--no-select shape the pairs"),
        (["train", "--method", "sft"], "--method must be 'dpo' or 'grpo'"),
    ]:
        out = runner.invoke(app, argv)
        assert out.exit_code == 1, (argv, out.output)
        assert message in out.output, (argv, out.output)


def test_kaizen_train_method_grpo_dry_run_lists_the_tasks(home: Path) -> None:  # noqa: F811
    from typer.testing import CliRunner

    from kaizen.cli import app

    out = CliRunner().invoke(app, ["train", "--method", "grpo", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "round (dry run): dry_run" in out.output
    assert "suite: mbpp_train" in out.output and "pairs" not in out.output
    assert not (home / "rounds").exists()


def test_the_gating_benchmark_reads_the_steps_from_the_trainers_log() -> None:
    from benchmarks.grpo_gating import _steps, table

    history = [
        {"step": 1, "reward": 1.5, "outcome/pass_rate": 0.25, "format/rate": 1.0, "step_time": 7},
        {"step": 2, "reward": 2.0, "outcome/pass_rate": 0.5, "process/mean": 0.75},
        {"step": 2, "train_runtime": 3.0},  # the run's summary, not a step
    ]
    rows = _steps(history)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["judge"] is None and rows[1]["judge"] == 0.75 and rows[1]["pass"] == 0.5
    assert rows[0]["seconds"] == 7.0 and rows[1]["seconds"] is None
    text = table({"gated": rows, "ungated": rows[:1]})
    lines = text.splitlines()
    assert "gated reward" in lines[0] and "ungated reward" in lines[0]
    assert lines[3].split()[:5] == ["2", "2.000", "0.500", "0.750", "-"]  # no step_time
    assert lines[3].split()[5:] == ["-"] * 4  # ungated has no step 2
    assert lines[-1].split() == ["mean", "1.750", "0.375", "0.750", "7", "1.500", "0.250", "-", "7"]
