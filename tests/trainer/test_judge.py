"""The judge (trainer/judge.py): strict parsing of its answers, its call and score, the
agreement with sealed verdicts that gates judge pairs, and the transformers judge on the tiny
model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from trainer.judge import (
    PROMPT_VERSION,
    QUESTIONS,
    GeneratorJudge,
    JudgeItem,
    JudgeVerdict,
    TransformersJudge,
    build_prompt,
    measure_agreement,
    parse_answers,
)


def verdict(api: bool | None, consistent: bool | None, runs: bool | None) -> JudgeVerdict:
    return JudgeVerdict({"api": api, "consistent": consistent, "runs": runs}, raw="")


def test_exact_answers_parse() -> None:
    text = "api: yes\nconsistent: no\nruns: YES\n"
    assert parse_answers(text) == {"api": True, "consistent": False, "runs": True}
    assert parse_answers("  api :  no  \nother: yes\nconsistent: yes\nruns: no") == {
        "api": False,
        "consistent": True,
        "runs": False,
    }


@pytest.mark.parametrize(
    "runs_line",
    ["runs: yes.", "runs: probably", "runs: yes, but slowly", "runs: y", "runs:", "runs: yes no"],
)
def test_anything_but_an_exact_yes_or_no_is_unparsed(runs_line: str) -> None:
    answers = parse_answers(f"api: yes\nconsistent: no\n{runs_line}\n")
    assert answers == {"api": True, "consistent": False, "runs": None}


def test_missing_and_repeated_answers_are_unparsed_never_guessed() -> None:
    assert parse_answers("yes\nyes\nyes") == dict.fromkeys(QUESTIONS)
    assert parse_answers("api: yes\napi: no\nconsistent: yes") == {
        "api": None,  # said twice (even the same way twice is not one answer)
        "consistent": True,
        "runs": None,  # missing
    }
    assert parse_answers("api: yes\napi: yes\n")["api"] is None


def test_score_and_call() -> None:
    assert verdict(True, False, True).score == pytest.approx(2 / 3)
    assert verdict(True, None, None).score == 1.0
    assert verdict(None, None, None).score is None
    assert verdict(True, True, True).correct is True
    assert verdict(True, None, False).correct is False  # one parsed "no" is enough
    assert verdict(True, None, True).correct is None  # an unparsed answer: no call


def test_prompt_shows_the_context_the_completion_and_the_format() -> None:
    prompt = build_prompt(JudgeItem("def f(x):\n    ", "return x + 1", "\n\nprint(f(1))\n"))
    assert "def f(x):\n    <completion>return x + 1</completion>\n\nprint(f(1))" in prompt
    for key, question in QUESTIONS.items():
        assert f"{key}: {question}" in prompt and f"{key}: <yes or no>" in prompt


def test_agreement_counts_unparsed_calls_against_the_judge() -> None:
    verdicts = [
        verdict(True, True, True),  # correct, passed: agrees
        verdict(True, True, True),  # correct, failed: disagrees
        verdict(False, True, True),  # not correct, failed: agrees
        verdict(True, None, True),  # no call, passed: counts as disagreeing
    ]
    a = measure_agreement(verdicts, [True, False, False, True])
    assert (a.judged, a.parsed, a.agreed, a.said_correct, a.correct_and_passed, a.passed) == (
        4,
        3,
        2,
        2,
        1,
        2,
    )
    assert a.agreement == 0.5 and a.precision == 0.5 and a.majority == 0.5
    assert a.to_json()["agreement"] == 0.5
    with pytest.raises(ValueError, match="3 judge verdicts for 2"):
        measure_agreement(verdicts[:3], [True, False])


def test_agreement_threshold_needs_enough_verdicts() -> None:
    always_right = measure_agreement([verdict(True, True, True)] * 10, [True] * 10)
    assert always_right.agreement == 1.0
    assert always_right.clears(0.75, min_judged=10)
    assert not always_right.clears(0.75, min_judged=11)  # too few to trust
    always_yes = measure_agreement([verdict(True, True, True)] * 10, [True] * 3 + [False] * 7)
    assert always_yes.agreement == pytest.approx(0.3) and not always_yes.clears(0.75, 1)
    nothing = measure_agreement([], [])
    assert nothing.agreement is None and not nothing.clears(0.0, 1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.utils.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("judge") / "model")


def test_transformers_judge_on_the_tiny_model(tiny_model: Path) -> None:
    judge = TransformersJudge(tiny_model, name="tiny", max_new_tokens=12, batch_size=2)
    assert (judge.name, judge.prompt_version) == ("tiny", PROMPT_VERSION)
    items = [
        JudgeItem("import math\n\ndef area(r):\n    ", "return math.pi * r ** 2", "\n"),
        JudgeItem("def add(a, b):\n    ", "return a +", "\n"),
        JudgeItem("x = ", "1", ""),
    ]
    verdicts = judge.judge(items)
    assert len(verdicts) == 3 and judge.judge([]) == []
    for v in verdicts:
        # The reply is begun with the first key; whatever the random model wrote after it is
        # parsed strictly, never guessed.
        assert v.raw.startswith("api:")
        assert v.answers == parse_answers(v.raw)
        assert set(v.answers) == set(QUESTIONS)
    # Greedy: the same items give the same replies, batched or not.
    again = TransformersJudge(tiny_model, max_new_tokens=12, batch_size=3).judge(items)
    assert [v.raw for v in again] == [v.raw for v in verdicts]


class ScriptedGenerator:
    """Answers every request with ``reply``; records the requests and the sampling."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.calls: list[tuple[list[Any], dict[str, Any]]] = []

    def generate(self, requests: Sequence[Any], **kwargs: Any) -> list[list[str]]:
        self.calls.append((list(requests), kwargs))
        return [[self.reply] for _ in requests]

    def close(self) -> None:
        pass


def test_generator_judge_asks_greedily_and_parses_strictly(tiny_model: Path) -> None:
    generator = ScriptedGenerator(" yes\nconsistent: no\nruns: maybe")
    judge = GeneratorJudge(generator, tiny_model, name="vllm-judge", max_new_tokens=20)
    items = [JudgeItem("def f(x):\n    ", "return x", "\n"), JudgeItem("x = ", "1", "")]
    verdicts = judge.judge(items)
    assert [v.answers for v in verdicts] == [{"api": True, "consistent": False, "runs": None}] * 2
    assert verdicts[0].raw == "api: yes\nconsistent: no\nruns: maybe"
    ((requests, kwargs),) = generator.calls
    assert kwargs["temperature"] == 0.0 and kwargs["n"] == 1 and kwargs["max_tokens"] == 20
    # The same prompt the transformers judge renders: chat template, reply begun with "api:".
    assert all(r.suffix is None and r.prompt.endswith("assistant\napi:") for r in requests)
    assert "<completion>return x</completion>" in requests[0].prompt
    assert judge.judge([]) == [] and len(generator.calls) == 1
