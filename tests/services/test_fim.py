"""Where a fill-in-the-middle completion stops."""

from __future__ import annotations

import pytest

from server.services.fim import FimFormat, suffix_stops


def test_prompt_format() -> None:
    assert FimFormat().build("a(", ")\n") == "<|fim_prefix|>a(<|fim_suffix|>)\n<|fim_middle|>"


@pytest.mark.parametrize(
    ("suffix", "stops"),
    [
        ("\n    return y\n", ["\n    return y", "return y"]),
        ("\n\n\nprint(x)", ["\n\n\nprint(x)", "print(x)"]),
        ("return y", ["return y"]),  # exact and loose coincide
        (")\n", [")"]),  # too short for a loose marker, exact only
        ("\n}\n", ["\n}"]),
        ("", []),
        ("\n \n", []),
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
