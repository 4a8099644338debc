"""Where a fill-in-the-middle completion stops."""

from __future__ import annotations

import pytest

from server.services.fim import FimFormat, suffix_stops


def test_prompt_format() -> None:
    assert FimFormat().build("a(", ")\n") == "<|fim_prefix|>a(<|fim_suffix|>)\n<|fim_middle|>"


@pytest.mark.parametrize(
    ("suffix", "stops"),
    [
        ("\n    return y\n", ["\n    return y", "return y", "\n    return "]),
        ("\n\n\nprint(add(1, 2))", ["\n\n\nprint(add(1, 2))", "print(add(1, 2))", "\nprint("]),
        ("return y", ["return y", "\nreturn "]),  # exact and loose coincide
        ("x(", ["x("]),  # loose and head forms too short
        (")\n", [")"]),  # nothing but the exact form
        ("\n}\n", ["\n}"]),
        ("", ["\n\n"]),  # nothing to run into: stop at the end of the block
        ("\n \n", ["\n\n"]),
    ],
)
def test_suffix_stops(suffix: str, stops: list[str]) -> None:
    assert suffix_stops(suffix) == stops


def test_cut_at_exact_stop_restores_the_file() -> None:
    prefix, suffix = "def add(a, b):\n    ", "\n    return y\n"
    generated = "y = a + b\n    return y\n"
    stop = suffix_stops(suffix)[0]
    middle = generated[: generated.index(stop)]
    assert prefix + middle + suffix == "def add(a, b):\n    y = a + b\n    return y\n"


def test_head_stop_catches_a_model_writing_new_code_instead_of_the_suffix() -> None:
    # Seen with Qwen2.5-Coder-0.5B-Instruct: it wrote `print(add(5` instead of the suffix.
    generated = "a + b\n\nprint(add(5"
    stops = suffix_stops("\n\n\nprint(add(1, 2))\n")
    cut = min((generated.find(s) for s in stops if s in generated), default=len(generated))
    assert generated[:cut] == "a + b\n"
