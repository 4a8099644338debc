"""Pairs that fit the token budget the way a fill-in-the-middle prompt must be cut.

IDE prompts are long (3,000 characters before the cursor and 1,000 after are ~1.1-1.4k
tokens), and cutting a FIM prompt at one end mangles it: keeping its start drops the suffix and
the ``<|fim_middle|>`` marker, keeping its end drops ``<|fim_prefix|>``. Here the text before
the cursor loses its oldest lines (from the left), the text after it its farthest lines (from
the right), the FIM prompt is rebuilt from what is left, and the completions are kept whole: a
pair whose completion alone does not fit is dropped, never cut. One budget (the serving
context, ``KAIZEN_MAX_MODEL_LEN``) then holds for selection and training alike, so neither
truncates anything.

A pair whose prompt held repository context (the other files before ``<|fim_prefix|>``, see
:func:`server.engine.fim.repo_context`) loses that context first, as the server drops
snippets before it cuts the prefix; only then are the prefix and suffix cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from server.engine.fim import FimFormat
from trainer.pairs import Pair

__all__ = ["FitResult", "fit_pairs"]

# Of the prompt's room, the text after the cursor keeps at most this share when both sides are
# too long (IDE clients send about three parts before the cursor to one after it).
SUFFIX_SHARE = 0.25


@dataclass
class FitResult:
    pairs: list[Pair]  # those that fit, trimmed where needed, in input order
    funnel: dict[str, Any]


def fit_pairs(pairs: Sequence[Pair], tokenizer: Any, budget: int) -> FitResult:
    """Trim each pair's prompt so that prompt + the longer completion + an end token fit in
    ``budget`` tokens of ``tokenizer`` (the model's, Hugging Face ``encode``/``decode``; see
    the module docstring); drop pairs that cannot fit.

    The funnel counts ``fitted`` (unchanged), ``trimmed`` (prompt trimmed), ``prefix_tokens_cut``
    and ``suffix_tokens_cut``, and under ``too_long`` those dropped: ``completion`` (a
    completion alone leaves no room for a prompt) and ``prompt`` (a chat prompt, which cannot
    be trimmed without changing the conversation).
    """
    if budget < 8:
        raise ValueError(f"budget must be at least 8 tokens: {budget}")
    fim = FimFormat()

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    overhead = count(fim.build("", ""))
    kept: list[Pair] = []
    funnel: dict[str, Any] = {
        "budget": budget,
        "fitted": 0,
        "trimmed": 0,
        "prefix_tokens_cut": 0,
        "suffix_tokens_cut": 0,
        "context_dropped": 0,
        "too_long": {"completion": 0, "prompt": 0},
    }
    for pair in pairs:
        completion = max(count(pair.chosen), count(pair.rejected)) + 1  # + the end token
        room = budget - completion
        if room < overhead + 1:
            funnel["too_long"]["completion"] += 1
            continue
        if count(pair.prompt) <= room:
            funnel["fitted"] += 1
            kept.append(pair)
            continue
        if pair.prefix is None:  # a chat prompt
            funnel["too_long"]["prompt"] += 1
            continue
        if pair.context:  # the repository context goes first, as on the server
            funnel["context_dropped"] += 1
            without = (
                fim.build(pair.prefix, pair.suffix) if pair.suffix is not None else pair.prefix
            )
            pair = replace(pair, prompt=without, context="")
            if count(pair.prompt) <= room:
                funnel["trimmed"] += 1
                kept.append(pair)
                continue
        trimmed, cut_prefix, cut_suffix = _trim(pair, tokenizer, room, overhead, fim)
        if trimmed is None:
            funnel["too_long"]["prompt"] += 1
            continue
        funnel["trimmed"] += 1
        funnel["prefix_tokens_cut"] += cut_prefix
        funnel["suffix_tokens_cut"] += cut_suffix
        kept.append(trimmed)
    return FitResult(pairs=kept, funnel=funnel)


def _trim(
    pair: Pair, tokenizer: Any, room: int, overhead: int, fim: FimFormat
) -> tuple[Pair | None, int, int]:
    """The pair with its prefix cut from the left and its suffix from the right, on line
    boundaries, so that the rebuilt prompt takes at most ``room`` tokens; with the tokens cut."""
    assert pair.prefix is not None
    pre = list(tokenizer.encode(pair.prefix, add_special_tokens=False))
    suf = list(tokenizer.encode(pair.suffix, add_special_tokens=False)) if pair.suffix else []
    avail = room - (overhead if pair.suffix is not None else 0)
    if avail < 1:
        return None, 0, 0
    suf_keep = min(len(suf), max(int(avail * SUFFIX_SHARE), avail - len(pre)))
    pre_keep = min(len(pre), avail - suf_keep)
    prefix = _left_cut(tokenizer.decode(pre[len(pre) - pre_keep :]), pre_keep < len(pre))
    suffix = (
        _right_cut(tokenizer.decode(suf[:suf_keep]), suf_keep < len(suf))
        if pair.suffix is not None
        else None
    )
    # Decoding and re-encoding may merge tokens differently: drop whole lines until it fits.
    for _ in range(1000):
        prompt = fim.build(prefix, suffix) if suffix is not None else prefix
        if len(tokenizer.encode(prompt, add_special_tokens=False)) <= room:
            break
        prefix = prefix.split("\n", 1)[1] if "\n" in prefix else prefix[len(prefix) // 2 :]
    else:
        return None, 0, 0
    cut_prefix = len(pre) - len(tokenizer.encode(prefix, add_special_tokens=False))
    cut_suffix = (
        len(suf) - len(tokenizer.encode(suffix, add_special_tokens=False)) if suffix else len(suf)
    )
    return replace(pair, prompt=prompt, prefix=prefix, suffix=suffix), cut_prefix, cut_suffix


def _left_cut(text: str, was_cut: bool) -> str:
    """A prefix cut from the left starts at a whole line (and never in a broken character)."""
    if was_cut and "\n" in text:
        return text.split("\n", 1)[1]
    return text.lstrip("\ufffd")


def _right_cut(text: str, was_cut: bool) -> str:
    """A suffix cut from the right ends after a whole line."""
    if was_cut and "\n" in text:
        return text[: text.rindex("\n") + 1]
    return text.rstrip("\ufffd")
