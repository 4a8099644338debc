"""Where a fill-in-the-middle completion stops."""

from __future__ import annotations

import pytest

from server.engine.fim import (
    FimFormat,
    RepoFile,
    SplitPrompt,
    block_stops,
    repo_context,
    split_fim_prompt,
    suffix_stops,
)


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


# ---------------------------------------------------------------- repository-level prompts

CONTINUE_MULTIFILE = (
    "<|repo_name|>app\n<|file_sep|>src/ops.py\ndef sub(a, b):\n    return a - b\n"
    "<|file_sep|>src/calc.py\n<|fim_prefix|>def add(a, b):\n    return <|fim_suffix|>\n"
    "<|fim_middle|>"
)


def test_repo_context_is_qwens_repository_level_format() -> None:
    files = [RepoFile("src/ops.py", "def sub(a, b):\n    return a - b")]
    context = repo_context("app", files, "src/calc.py")
    # Byte for byte what Continue's qwenMultifileFimTemplate sends for the same files.
    assert FimFormat().build("def add(a, b):\n    return ", "\n", context) == CONTINUE_MULTIFILE
    assert repo_context("app", [], "src/calc.py") == ""  # no other file: file-level FIM


def test_continues_multifile_prompt_is_split_losslessly() -> None:
    split = split_fim_prompt(CONTINUE_MULTIFILE)
    assert split is not None
    assert (split.prefix, split.suffix) == ("def add(a, b):\n    return ", "\n")
    assert split.repo_name == "app" and split.file_path == "src/calc.py"
    assert FimFormat().build(split.prefix, split.suffix, split.context) == CONTINUE_MULTIFILE


def test_file_level_prompt_is_split_without_context() -> None:
    split = split_fim_prompt("<|fim_prefix|>a(<|fim_suffix|>)\n<|fim_middle|>")
    assert split == SplitPrompt("a(", ")\n", "", None, None)


@pytest.mark.parametrize(
    "prompt",
    [
        "def f(): pass",
        "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>c",  # text after the middle
        "<|fim_suffix|>b<|fim_prefix|>a<|fim_middle|>",  # out of order (SPM)
        "<|fim_prefix|>a<|fim_prefix|>x<|fim_suffix|>b<|fim_middle|>",  # a marker twice
        "<fim_prefix>a<fim_suffix>b<fim_middle>",  # StarCoder's markers: not this model's
    ],
)
def test_other_prompts_are_not_split(prompt: str) -> None:
    assert split_fim_prompt(prompt) is None


@pytest.mark.parametrize(
    ("prefix", "inside"),
    [
        ("def f(x):\n    ", True),  # the body's indentation
        ("def f(x):\n    y = ", True),  # mid-line in the body
        ("def f(x):\n", True),  # column 0 under a block opener
        ("class A:\n    def m(self):\n        return 1\n", True),  # column 0 after a body line
        ("import os\n", False),  # top level
        ("x = ", False),
        ("", False),
    ],
)
def test_python_block_stops_only_inside_a_block(prefix: str, inside: bool) -> None:
    stops = block_stops(prefix, "python")
    assert ("\ndef " in stops) is inside
    assert ("\nclass " in stops) is inside
    assert block_stops(prefix, "rust") == []  # no rule for other languages
    assert block_stops(prefix, None) == []
