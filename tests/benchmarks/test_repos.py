"""benchmarks/repos.py's evaluation of masked functions (what ``loop.py --traffic repos``
measures before and after a round), on the vendored tiny project: the completion is spliced in,
the project's own tests decide, and the file is restored byte for byte."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks.repos import Project, Spec, evaluate_targets, masked, targets

PROJECT = Path(__file__).resolve().parents[1] / "data" / "oracle_project"


class Scripted:
    """Answers each masked function with the text given for it (by the prompt's last def)."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.seen: list[Any] = []
        self.requests: list[Any] = []

    def generate(self, requests: list[Any], **kwargs: Any) -> list[list[str]]:
        self.seen.append(kwargs)
        self.requests = list(requests)
        out = []
        for r in requests:
            name = r.prompt.rsplit("def ", 1)[1].split("(", 1)[0]
            out.append([self.answers[name]])
        return out


def _project(tmp_path: Path) -> Project:
    checkout = tmp_path / "tinycalc"
    shutil.copytree(PROJECT, checkout)
    ops = checkout / "tinycalc" / "ops.py"
    covered = {str(ops.resolve()): set(range(1, 200))}
    found = targets(checkout, covered, "body")
    return Project(Spec.parse("tinycalc==0.1"), checkout, Path(sys.executable), [], found)


def test_a_masked_function_is_judged_by_the_projects_own_tests(tmp_path: Path) -> None:
    project = _project(tmp_path)
    assert sorted(t.function for t in project.targets) == ["add", "clamp", "scale"]
    ops = project.checkout / "tinycalc" / "ops.py"
    before = ops.read_bytes()
    prefix, suffix = masked(project, project.targets[0], 3000, 1000)
    assert prefix.endswith('"""\n    ') and "return" not in suffix.split("def ", 1)[0]

    generator = Scripted(
        {"add": "return a + b", "scale": "return [v + factor for v in values]", "clamp": ""}
    )
    items = [(project, t) for t in sorted(project.targets, key=lambda t: t.function)]
    result = evaluate_targets(
        generator, items, suite="repo_functions", adapter=None, mode="body", max_tokens=64
    )
    assert result.passed == [True, False, False]  # add right, clamp empty, scale wrong
    assert result.pass_at_1 == 1 / 3
    assert [i.split(":")[2] for i in result.task_ids] == ["add", "clamp", "scale"]
    # The server's block stops for Python, as the extension's requests get them.
    assert all("\ndef " in r.stop for r in generator.requests)
    assert generator.seen == [
        {"adapter": None, "n": 1, "temperature": 0.0, "max_tokens": 64, "progress": True}
    ]
    assert ops.read_bytes() == before  # restored
