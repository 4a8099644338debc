"""Fitting pairs to the token budget as FIM needs it: the text before the cursor loses its
oldest lines, the text after it its farthest ones, the FIM prompt is rebuilt, completions stay
whole; what cannot fit is dropped and counted. With the tiny model's real BPE tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.engine.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, FimFormat
from tests.utils.tiny_model import build_tiny_tokenizer
from trainer.budget import fit_pairs
from trainer.pairs import Pair

# IDE-sized: ~3,000 characters before the cursor, ~1,000 after it.
PREFIX = "".join(f"def helper_{i}(x):\n    return x + {i}\n\n" for i in range(100)) + (
    "def add(a, b):\n    "
)
SUFFIX = "\n\n" + "".join(f"print(helper_{i}(1))\n" for i in range(50))
CHOSEN = "return a + b"
REJECTED = "return a - b"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path_factory.mktemp("t"))))


def _fim_pair(prefix: str = PREFIX, suffix: str = SUFFIX, chosen: str = CHOSEN) -> Pair:
    return Pair(
        id="p1",
        prompt=FimFormat().build(prefix, suffix),
        chosen=chosen,
        rejected=REJECTED,
        source="ci",
        prefix=prefix,
        suffix=suffix,
    )


def _tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_a_long_fim_prompt_is_trimmed_on_both_sides_and_rebuilt(tokenizer: Any) -> None:
    pair = _fim_pair()
    full = _tokens(tokenizer, pair.prompt)
    budget = 256
    assert full > budget  # the case TRL's keep-start truncation mangles
    result = fit_pairs([pair], tokenizer, budget)
    (fitted,) = result.pairs
    assert result.funnel["trimmed"] == 1 and result.funnel["too_long"]["completion"] == 0
    # A well-formed FIM prompt of what is nearest the cursor, rebuilt from whole lines.
    assert fitted.prompt == FimFormat().build(fitted.prefix, fitted.suffix)  # type: ignore[arg-type]
    assert fitted.prompt.startswith(FIM_PREFIX) and fitted.prompt.endswith(FIM_MIDDLE)
    assert FIM_SUFFIX in fitted.prompt
    assert fitted.prefix and PREFIX.endswith(fitted.prefix)
    assert PREFIX[len(PREFIX) - len(fitted.prefix) - 1] == "\n"  # starts on a line of its own
    assert fitted.suffix and SUFFIX.startswith(fitted.suffix) and fitted.suffix.endswith("\n")
    assert len(fitted.prefix) < len(PREFIX) and len(fitted.suffix) < len(SUFFIX)
    # The completions are whole, and prompt + completion + end token fit the budget.
    assert (fitted.chosen, fitted.rejected, fitted.id) == (CHOSEN, REJECTED, "p1")
    longest = max(_tokens(tokenizer, CHOSEN), _tokens(tokenizer, REJECTED))
    assert _tokens(tokenizer, fitted.prompt) + longest + 1 <= budget
    cut = result.funnel["prefix_tokens_cut"] + result.funnel["suffix_tokens_cut"]
    assert cut >= full - budget
    assert result.funnel["prefix_tokens_cut"] > result.funnel["suffix_tokens_cut"] > 0


def test_a_short_suffix_keeps_whole_and_the_prefix_takes_the_rest(tokenizer: Any) -> None:
    (fitted,) = fit_pairs([_fim_pair(suffix="\n")], tokenizer, 200).pairs
    assert fitted.suffix == "\n"
    assert _tokens(tokenizer, fitted.prompt) > 150  # the room went to the prefix


def test_pairs_that_fit_are_untouched(tokenizer: Any) -> None:
    pair = _fim_pair(prefix="def add(a, b):\n    ", suffix="\n")
    result = fit_pairs([pair], tokenizer, 2048)
    assert result.pairs == [pair] and result.funnel["fitted"] == 1


def test_what_cannot_fit_is_dropped_and_counted(tokenizer: Any) -> None:
    long_completion = _fim_pair(chosen="x = 1\n" * 200)
    chat = Pair(id="c", prompt="<|im_start|>user\n" + PREFIX, chosen="ok", rejected="no",
                source="ci")  # fmt: skip
    plain = Pair(id="plain", prompt=PREFIX, chosen=CHOSEN, rejected=REJECTED, source="ci",
                 prefix=PREFIX, suffix=None)  # fmt: skip
    result = fit_pairs([long_completion, chat, plain], tokenizer, 128)
    assert result.funnel["too_long"] == {"completion": 1, "prompt": 1}
    (kept,) = result.pairs
    # A plain prompt loses its oldest lines only.
    assert kept.id == "plain" and kept.suffix is None and PREFIX.endswith(kept.prompt)
    assert kept.prompt.endswith("def add(a, b):\n    ")


def test_budget_is_checked(tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="budget"):
        fit_pairs([], tokenizer, 4)


def test_a_repository_context_is_dropped_before_the_prefix_is_cut(tokenizer: Any) -> None:
    """As on the server: other files' snippets go first; the text around the cursor stays."""
    from dataclasses import replace

    from server.engine.fim import RepoFile, repo_context

    prefix, suffix = "def add(a, b):\n    ", "\n"
    snippets = [RepoFile(f"src/m{i}.py", f"def helper_{i}(x):\n    return x\n") for i in range(40)]
    context = repo_context("app", snippets, "src/app.py")
    pair = replace(
        _fim_pair(prefix, suffix),
        prompt=FimFormat().build(prefix, suffix, context),
        context=context,
    )
    room_for_file = _tokens(tokenizer, FimFormat().build(prefix, suffix))
    assert _tokens(tokenizer, pair.prompt) > 4 * room_for_file
    budget = room_for_file + _tokens(tokenizer, CHOSEN) + 8
    result = fit_pairs([pair], tokenizer, budget)
    (fitted,) = result.pairs
    assert fitted.prompt == FimFormat().build(prefix, suffix)  # the file-level prompt, whole
    assert fitted.context == "" and fitted.prefix == prefix and fitted.suffix == suffix
    assert result.funnel["context_dropped"] == 1 and result.funnel["prefix_tokens_cut"] == 0
    # With room for everything, the context stays.
    roomy = fit_pairs([pair], tokenizer, 4096)
    assert roomy.pairs[0].prompt == pair.prompt and roomy.funnel["context_dropped"] == 0
