"""A judge model's strictly parsed yes/no answers about a completion where no test ran (RLAIF).

The judge reads a completion in its context (the code before and after the cursor) and answers a
fixed questionnaire. Its answers are parsed strictly: a question whose line is missing, repeated,
or says anything but exactly ``yes`` or ``no`` is *unparsed* (``None``), never guessed. A verdict
carries the judge's name and :data:`PROMPT_VERSION`, so answers from different questionnaires or
models are never mixed. The judge is a weaker signal than execution: :mod:`trainer.pairs` uses it
only among alternatives with no sealed verdict, and only once it agrees with sealed verdicts
often enough (:func:`measure_agreement`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "PROMPT_VERSION",
    "QUESTIONS",
    "Agreement",
    "GeneratorJudge",
    "Judge",
    "JudgeItem",
    "JudgeVerdict",
    "TransformersJudge",
    "build_prompt",
    "measure_agreement",
    "parse_answers",
    "render_prompt",
]

log = logging.getLogger(__name__)

PROMPT_VERSION = "q3-v2"
"""Changes whenever the questionnaire or the prompt around it changes."""

QUESTIONS: dict[str, str] = {
    "api": "Does the completion use every function, method and module correctly (names that "
    "exist, arguments they accept)?",
    "consistent": "Is the completion consistent with the code after the cursor?",
    "runs": "Would the file run without an error?",
}
"""The questionnaire, in order: the answer key and its question."""

_SYSTEM = "You review code completions. Answer only in the format asked for."
_REPLY_START = f"{next(iter(QUESTIONS))}:"  # the reply is begun for the model: "api:"
_MAX_CONTEXT_CHARS = 4000  # each side of the cursor; the judge needs the nearby code, not all


@dataclass(frozen=True)
class JudgeItem:
    """One completion in its context, as the judge sees it."""

    prefix: str  # the code before the cursor
    completion: str  # the inserted text
    suffix: str  # the code after the cursor
    language: str = "python"


@dataclass(frozen=True)
class JudgeVerdict:
    """The judge's answers to :data:`QUESTIONS` (``None``: unparsed) and its raw output."""

    answers: dict[str, bool | None]
    raw: str

    @property
    def score(self) -> float | None:
        """The share of ``yes`` among the parsed answers; ``None`` if none parsed."""
        parsed = [a for a in self.answers.values() if a is not None]
        if not parsed:
            return None
        return sum(parsed) / len(parsed)

    @property
    def correct(self) -> bool | None:
        """``True`` when every question parsed as ``yes``, ``False`` when any parsed as ``no``,
        ``None`` otherwise (some unparsed and no ``no``): the judge's call on the completion."""
        values = [self.answers.get(key) for key in QUESTIONS]
        if any(v is False for v in values):
            return False
        if all(v is True for v in values):
            return True
        return None


class Judge(Protocol):
    """What a round needs of a judge (:class:`TransformersJudge`; tests use scripted ones)."""

    name: str
    prompt_version: str

    def judge(self, items: Sequence[JudgeItem]) -> list[JudgeVerdict]: ...


_ANSWER_LINE = re.compile(r"^\s*([A-Za-z_]+)\s*:\s*(.*?)\s*$")


def parse_answers(text: str) -> dict[str, bool | None]:
    """Each question's answer in ``text``: ``True`` for a line ``<key>: yes``, ``False`` for
    ``<key>: no`` (case-insensitive, surrounding spaces ignored), ``None`` when the key's line is
    missing, appears more than once, or holds anything else ("yes.", "probably", "yes, but").
    Lines for other keys and other text are ignored."""
    seen: dict[str, list[str]] = {key: [] for key in QUESTIONS}
    for line in text.splitlines():
        match = _ANSWER_LINE.match(line)
        if match and match.group(1).lower() in seen:
            seen[match.group(1).lower()].append(match.group(2).lower())
    answers: dict[str, bool | None] = {}
    for key, values in seen.items():
        if len(values) == 1 and values[0] in ("yes", "no"):
            answers[key] = values[0] == "yes"
        else:
            answers[key] = None
    return answers


def _clip(prefix: str, suffix: str) -> tuple[str, str]:
    return prefix[-_MAX_CONTEXT_CHARS:], suffix[:_MAX_CONTEXT_CHARS]


def build_prompt(item: JudgeItem) -> str:
    """The user message for ``item``: the context with the completion marked, the questionnaire
    and the exact answer format."""
    prefix, suffix = _clip(item.prefix, item.suffix)
    questions = "\n".join(f"{key}: {question}" for key, question in QUESTIONS.items())
    answer_format = "\n".join(f"{key}: <yes or no>" for key in QUESTIONS)
    return (
        f"Here is a {item.language} file. The code between <completion> and </completion> was "
        "inserted by a code assistant at the cursor.\n\n"
        f"```{item.language}\n{prefix}<completion>{item.completion}</completion>{suffix}\n```\n\n"
        f"Answer each question with yes or no.\n{questions}\n\n"
        f"Reply with exactly these {len(QUESTIONS)} lines, each ending in the word yes or the "
        f"word no, and nothing else:\n{answer_format}\n"
    )


def render_prompt(tokenizer: Any, item: JudgeItem) -> str:
    """The judge's whole prompt for ``item``: the chat template (when the tokenizer has one)
    around :func:`build_prompt`, ending with the reply begun (``api:``)."""
    user = build_prompt(item)
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": user},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text) + _REPLY_START
    return f"{_SYSTEM}\n\n{user}\n{_REPLY_START}"


class TransformersJudge:
    """:class:`Judge` over a local Hugging Face causal LM directory: greedy, batched, on the CPU
    unless CUDA is there. An instruct model's chat template is used when it has one, and the
    reply is started with the first answer's key (``api:``): a small model told the format
    otherwise answers a bare "yes" per line, which strict parsing rightly refuses. The raw text
    stored is that start plus what the model wrote."""

    def __init__(
        self,
        model_dir: Path,
        *,
        name: str | None = None,
        max_new_tokens: int = 24,
        batch_size: int = 4,
        prompt_version: str = PROMPT_VERSION,
        progress: bool = False,
    ) -> None:
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.name
        self.prompt_version = prompt_version
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.progress = progress
        self._model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def _load(self) -> tuple[Any, Any]:
        if self._model is None or self._tokenizer is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
            tokenizer.padding_side = "left"  # generation continues at the right end
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=dtype)
            model.to(device).eval()
            self._model, self._tokenizer = model, tokenizer
        return self._model, self._tokenizer

    def _render(self, tokenizer: Any, item: JudgeItem) -> str:
        return render_prompt(tokenizer, item)

    def judge(self, items: Sequence[JudgeItem]) -> list[JudgeVerdict]:
        if not items:
            return []
        import torch

        model, tokenizer = self._load()
        from tqdm import tqdm

        verdicts: list[JudgeVerdict] = []
        starts = range(0, len(items), self.batch_size)
        for start in tqdm(starts, desc="judge", unit="batch", disable=not self.progress):
            batch = items[start : start + self.batch_size]
            prompts = [self._render(tokenizer, item) for item in batch]
            encoded = tokenizer(
                prompts, return_tensors="pt", padding=True, add_special_tokens=False
            )
            encoded = {k: v.to(model.device) for k, v in encoded.items()}
            with torch.inference_mode():
                out = model.generate(
                    **encoded,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = out[:, encoded["input_ids"].shape[1] :]
            for row in new_tokens:
                raw = _REPLY_START + tokenizer.decode(row, skip_special_tokens=True)
                verdicts.append(JudgeVerdict(answers=parse_answers(raw), raw=raw))
        log.info("judge.done name=%s items=%d", self.name, len(items))
        return verdicts


class GeneratorJudge:
    """:class:`Judge` over a :class:`trainer.generate.Generator` (vLLM on a GPU host, where a
    larger coder can judge): the same prompt and reply start as :class:`TransformersJudge`,
    greedy, all items in one batch. ``tokenizer_dir``: the judge model's tokenizer (its chat
    template)."""

    def __init__(
        self,
        generator: Any,
        tokenizer_dir: Path,
        *,
        name: str | None = None,
        max_new_tokens: int = 24,
        prompt_version: str = PROMPT_VERSION,
    ) -> None:
        self.generator = generator
        self.tokenizer_dir = Path(tokenizer_dir)
        self.name = name or self.tokenizer_dir.name
        self.prompt_version = prompt_version
        self.max_new_tokens = max_new_tokens
        self._tokenizer: Any = None

    def judge(self, items: Sequence[JudgeItem]) -> list[JudgeVerdict]:
        if not items:
            return []
        from trainer.generate import GenerationRequest

        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        requests = [GenerationRequest(render_prompt(self._tokenizer, item)) for item in items]
        outputs = self.generator.generate(
            requests, n=1, temperature=0.0, max_tokens=self.max_new_tokens, seed=0
        )
        raws = [_REPLY_START + texts[0] for texts in outputs]
        return [JudgeVerdict(answers=parse_answers(raw), raw=raw) for raw in raws]


@dataclass(frozen=True)
class Agreement:
    """How a judge's calls (:attr:`JudgeVerdict.correct`) compare with sealed execution verdicts
    on the same completions. An unparsed call counts against agreement: a judge that cannot
    answer in the format does not agree."""

    judged: int  # completions with a sealed verdict the judge answered about
    parsed: int  # of those, with a call (every answer parsed, or a parsed "no")
    agreed: int  # the call matches the verdict (correct and passed, or not and failed)
    said_correct: int
    correct_and_passed: int
    passed: int  # sealed passes among the judged

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.judged if self.judged else None

    @property
    def precision(self) -> float | None:
        """Of the completions the judge called correct, the share that passed."""
        return self.correct_and_passed / self.said_correct if self.said_correct else None

    @property
    def majority(self) -> float | None:
        """The agreement of always giving the commoner verdict: what a judge must beat."""
        if not self.judged:
            return None
        return max(self.passed, self.judged - self.passed) / self.judged

    def clears(self, threshold: float, min_judged: int) -> bool:
        """Enough sealed verdicts were compared, and the agreement reaches ``threshold``."""
        return self.judged >= min_judged and (self.agreement or 0.0) >= threshold

    def to_json(self) -> dict[str, Any]:
        def rounded(x: float | None) -> float | None:
            return round(x, 4) if x is not None else None

        return {
            "judged": self.judged,
            "parsed": self.parsed,
            "agreed": self.agreed,
            "said_correct": self.said_correct,
            "correct_and_passed": self.correct_and_passed,
            "passed": self.passed,
            "agreement": rounded(self.agreement),
            "precision": rounded(self.precision),
            "majority": rounded(self.majority),
        }


def measure_agreement(verdicts: Sequence[JudgeVerdict], passed: Sequence[bool]) -> Agreement:
    """Compare the judge's calls with the sealed verdicts (``passed``), item by item."""
    if len(verdicts) != len(passed):
        raise ValueError(f"{len(verdicts)} judge verdicts for {len(passed)} sealed verdicts")
    calls = [v.correct for v in verdicts]
    return Agreement(
        judged=len(calls),
        parsed=sum(c is not None for c in calls),
        agreed=sum(c is not None and c == p for c, p in zip(calls, passed, strict=True)),
        said_correct=sum(c is True for c in calls),
        correct_and_passed=sum(c is True and p for c, p in zip(calls, passed, strict=True)),
        passed=sum(passed),
    )
