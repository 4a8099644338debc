"""Traffic on real projects: PyPI sdists that ship their tests, completions asked for as the VS
Code extension asks, the project's own tests under pytest-kaizen with CI-side exploration.

For each project (``NAME==VERSION``, optionally ``:SHA256``; the defaults are pinned below): the
sdist is downloaded with pip and checked against its SHA-256, unpacked into a git checkout,
installed editable into a venv of its own with pytest, coverage and the Kaizen CI clients; one
coverage run finds the functions its tests execute (and the tests that fail before anything is
changed, which are deselected from then on). Then, for up to ``--per-project`` of those
functions (seeded draw): the function's body (``--mode body``) or one executed line of it
(``--mode line``, single-line traffic) is masked, a completion is requested exactly as the
extension would (its 3,000/1,000-character window, ``context.repository``, ``file_path``, an
ide token), accepted into the file with an ``accepted`` event and a ledger entry pushed to the
server, and the project's tests run under pytest-kaizen with the real ledger flow (the plugin
fetches the ledger with a ci token) and ``--kaizen-explore``. With ``--fix``, a failed
completion is then "fixed" by the developer (the original code put back, the ledger updated)
and the tests run again. The file is restored before the next completion.

At the end the server's records of these completions go through the trainer's pair builder
(:func:`trainer.pairs.build_pairs` on :func:`trainer.records.load_outcome_records`, as a round
does) and the table shows, per project: accepted completions, their CI pass rate, verdicts
attributed per test against fallen back to the run's status, execution-verified pairs per 100
accepted completions by source, and the CI time spent exploring.

Needs a running Kaizen server and its database (``make serve``; tokens from
``kaizen tokens create``)::

    KAIZEN_IDE_TOKEN=kz_... KAIZEN_CI_TOKEN=kz_... KAIZEN_OPS_TOKEN=kz_... \\
    .venv/bin/python benchmarks/repos.py --url http://127.0.0.1:8000 \\
        --database-url sqlite:///$HOME/.kaizen/kaizen.db [--project toolz==1.0.0 ...] \\
        [--per-project 10] [--mode body|line] [--explore 2] [--explore-k 4] [--fix]

Prints a table and writes JSON to ``benchmarks/results/repos-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `server`, `trainer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Pure-Python projects whose sdists ship their tests, pinned (SHA-256 of the sdist as PyPI
# serves it, checked on download).
DEFAULT_PROJECTS = [
    "toolz==1.0.0:2c86e3d9a04798ac556793bced838816296a2f085017664e4995cb40a1047a02",
    "more-itertools==10.5.0:5482bfef7849c25dc3c6dd53a6173ae4795da2a41a80faea6700d9f5846c5da6",
    "boltons==24.1.0:4a49b7d57ee055b83a458c8682a2a6f199d263a8aa517098bda9bab813554b87",
    "inflection==0.5.1:1a29730d366e996aaacffb2f1f1cb9593dc38e2ddd30c91250c6dde09ea9b417",
    "cachetools==5.5.0:2cc24fb4cbe39633fb7badd9db9ca6295d766d9c2995f245725a46715d050f2a",
    "six==1.16.0:1e61c37477a1626458e36f7b1d82aa5c9b094fa4802892072e49de9c60c4c926",
]
PREFIX_CHARS, SUFFIX_CHARS = 3000, 1000  # the extension's window (plugins/vscode/src/request.ts)
_TEST_DIRS = {"tests", "test", "testing", "docs", "doc", "examples", "benchmarks"}


@dataclass(frozen=True)
class Spec:
    name: str
    version: str
    sha256: str | None

    @classmethod
    def parse(cls, text: str) -> Spec:
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^:\s]+)(?::([0-9a-f]{64}))?", text)
        if match is None:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected NAME==VERSION or NAME==VERSION:SHA256"
            )
        return cls(match[1], match[2], match[3])


@dataclass
class Target:
    """A masked region: the function (or line) whose code the model is asked for."""

    file_path: str  # relative to the checkout
    function: str
    start: int  # character offsets of the masked region in the file
    end: int


@dataclass
class ProjectResult:
    name: str
    version: str
    functions_covered: int = 0
    completions: int = 0
    empty: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # requests the server refused
    statuses: Counter[str] = field(default_factory=Counter)
    per_test: int = 0
    run_level: int = 0
    fixed: int = 0
    explore_seconds: float = 0.0
    alternatives_judged: int = 0
    test_seconds: float = 0.0
    completion_ids: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # dataclasses.asdict would rebuild the Counters from item pairs (counting the pairs).
        out = {k: v for k, v in vars(self).items()}
        out["statuses"], out["refused"] = dict(self.statuses), dict(self.refused)
        return out


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 900):  # type: ignore[no-untyped-def]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def fetch_sdist(spec: Spec, into: Path) -> Path:
    """Download the sdist with pip and check its SHA-256; returns the unpacked directory."""
    downloads = into / "sdist"
    downloads.mkdir(parents=True, exist_ok=True)
    result = _run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
         f"{spec.name}=={spec.version}", "-d", str(downloads)],
        cwd=into,
    )  # fmt: skip
    archives = sorted(downloads.glob("*.tar.gz")) + sorted(downloads.glob("*.zip"))
    if result.returncode != 0 or not archives:
        raise RuntimeError(f"pip download {spec.name}=={spec.version} failed: {result.stderr}")
    archive = archives[0]
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if spec.sha256 is not None and digest != spec.sha256:
        raise RuntimeError(
            f"{archive.name}: SHA-256 {digest} is not the pinned {spec.sha256}; refusing it"
        )
    with tarfile.open(archive) as tar:
        tar.extractall(into / "src", filter="data")
    [top] = [p for p in (into / "src").iterdir() if p.is_dir()]
    return top


def prepare(spec: Spec, work: Path, pytest_requirement: str = "pytest") -> tuple[Path, Path]:
    """Checkout (a git repository with an ``origin``) and the venv's python."""
    checkout = fetch_sdist(spec, work)
    for args in (
        ["init", "-q", "-b", "main"],
        ["remote", "add", "origin", f"https://pypi.org/project/{spec.name.lower()}"],
        ["add", "-A"],
        ["commit", "-q", "-m", f"{spec.name} {spec.version}"],
    ):
        _run(["git", "-c", "user.name=b", "-c", "user.email=b@example.com", *args], checkout)
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], work)
    python = venv / "bin" / "python"
    install = _run(
        [str(python), "-m", "pip", "install", "-q", pytest_requirement, "coverage",
         str(ROOT / "plugins" / "common"), str(ROOT / "plugins" / "pytest"), "-e", str(checkout)],
        cwd=work,
    )  # fmt: skip
    if install.returncode != 0:
        raise RuntimeError(f"installing {spec.name} failed: {install.stderr[-2000:]}")
    return checkout, python


def _pytest_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAIZEN_")}
    env.update({"PYTHONDONTWRITEBYTECODE": "1", **extra})
    return env


def baseline(checkout: Path, python: Path) -> tuple[dict[str, set[int]], list[str]]:
    """Executed lines per file (coverage) and the tests that fail before any change."""
    results = checkout.parent / "baseline.json"
    run = _run(
        [str(python), "-m", "coverage", "run", "--data-file", str(checkout.parent / ".cov"),
         "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:kaizen",
         "-p", "pytest_kaizen.probe"],
        cwd=checkout,
        env=_pytest_env(KAIZEN_EXPLORE_RESULTS=str(results)),
    )  # fmt: skip
    _run(
        [str(python), "-m", "coverage", "json", "--data-file", str(checkout.parent / ".cov"),
         "-o", str(checkout.parent / "cov.json")],
        cwd=checkout,
    )  # fmt: skip
    covered: dict[str, set[int]] = {}
    data = json.loads((checkout.parent / "cov.json").read_text())
    for name, info in data["files"].items():
        path = Path(name)
        path = path if path.is_absolute() else checkout / path
        covered[str(path.resolve())] = set(info["executed_lines"])
    tests = json.loads(results.read_text())["tests"] if results.exists() else {}
    if not tests:
        raise RuntimeError(
            f"the project's tests did not run under this pytest: {run.stdout[-300:]!r} "
            "(an older project may need --pytest-requirement 'pytest<8')"
        )
    failing = sorted(n for n, s in tests.items() if s in ("failed", "error"))
    return covered, failing


def _source_files(checkout: Path) -> list[Path]:
    files = []
    for path in sorted(checkout.rglob("*.py")):
        parts = set(path.relative_to(checkout).parts[:-1])
        name = path.name
        if parts & _TEST_DIRS or name.startswith("test") or name in ("setup.py", "conftest.py"):
            continue
        files.append(path)
    return files


def _offset(lines: list[str], line: int, col: int) -> int:
    return sum(len(text) for text in lines[: line - 1]) + col


def targets(checkout: Path, covered: dict[str, set[int]], mode: str) -> list[Target]:
    """Functions whose body the tests execute; in ``line`` mode one executed simple line of each."""
    out = []
    for path in _source_files(checkout):
        executed = covered.get(str(path.resolve()), set())
        if not executed:
            continue
        text = path.read_text(encoding="utf-8")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]  # keep the docstring in the prompt
            if not body or all(isinstance(s, ast.Pass) for s in body):
                continue
            if not any(s.lineno in executed for s in body):
                continue
            if mode == "body":
                first, last = body[0], body[-1]
                start = _offset(lines, first.lineno, first.col_offset)
                end = _offset(lines, last.end_lineno or last.lineno, last.end_col_offset or 0)
            else:
                simple = [
                    s for s in body
                    if s.lineno in executed and s.lineno == s.end_lineno
                    and not isinstance(s, ast.Pass)
                ]  # fmt: skip
                if not simple:
                    continue
                pick = simple[len(simple) // 2]
                start = _offset(lines, pick.lineno, pick.col_offset)
                end = _offset(lines, pick.lineno, pick.end_col_offset or 0)
            relative = str(path.relative_to(checkout)).replace(os.sep, "/")
            out.append(Target(relative, node.name, start, end))
    return out


def window(
    text: str, cursor: int, prefix_chars: int = PREFIX_CHARS, suffix_chars: int = SUFFIX_CHARS
) -> tuple[str, str]:
    """The extension's context window (``contextWindows`` in plugins/vscode/src/request.ts;
    its ``prefixChars``/``suffixChars`` settings)."""
    start = max(0, cursor - prefix_chars)
    if start > 0 and text[start - 1] != "\n":
        newline = text.find("\n", start)
        if newline != -1 and newline + 1 < cursor and newline + 1 - start <= prefix_chars // 2:
            start = newline + 1
    end = min(len(text), cursor + suffix_chars)
    if end < len(text) and text[end - 1] != "\n":
        newline = text.rfind("\n", 0, end)
        if newline >= cursor and end - (newline + 1) <= suffix_chars // 2:
            end = newline + 1
    return text[start:cursor], text[cursor:end]


class Api:
    def __init__(self, url: str, ide: str, ci: str, ops: str) -> None:
        self.url, self.ci = url.rstrip("/"), ci
        self.http = httpx.Client(base_url=self.url, timeout=300)
        self.ide = {"Authorization": f"Bearer {ide}"}
        self.ops = {"Authorization": f"Bearer {ops}"}

    def complete(self, body: dict[str, Any]) -> dict[str, Any] | str:
        """The completion, or the server's error code for a request it refused (the
        extension shows nothing then, e.g. ``context_length_exceeded``)."""
        r = self.http.post("/v1/completions", headers=self.ide, json=body)
        if r.status_code == 400:
            return str(r.json()["error"].get("code") or "bad_request")
        r.raise_for_status()
        return r.json()

    def accept(self, cid: str, entry: dict[str, Any]) -> None:
        now = datetime.now(UTC).isoformat()
        event = {"id": str(uuid.uuid4()), "completion_id": cid, "type": "accepted",
                 "timestamp": now}  # fmt: skip
        self.http.post("/v1/events", headers=self.ide, json={"events": [event]}).raise_for_status()
        self.ledger({**entry, "updated_at": now})

    def ledger(self, entry: dict[str, Any]) -> None:
        r = self.http.put("/v1/ledger", headers=self.ide, json={"entries": [entry]})
        r.raise_for_status()

    def outcomes(self, cid: str) -> list[dict[str, Any]]:
        r = self.http.get(f"/v1/completions/{cid}", headers=self.ops)
        r.raise_for_status()
        return list(r.json().get("outcomes") or [])


def run_tests(
    api: Api,
    checkout: Path,
    python: Path,
    run_id: str,
    deselect: list[str],
    args: argparse.Namespace,
    explore: int,
) -> tuple[str, float, float, int]:
    """The project's tests under pytest-kaizen; (output, wall seconds, exploring seconds,
    alternatives judged)."""
    command = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "--kaizen-explore", str(explore), "--kaizen-explore-k", str(args.explore_k),
               "--kaizen-explore-budget", str(args.explore_budget)]  # fmt: skip
    for node in deselect:
        command += ["--deselect", node]
    env = _pytest_env(KAIZEN_URL=api.url, KAIZEN_TOKEN=api.ci, KAIZEN_RUN_ID=run_id)
    started = time.monotonic()
    result = _run(command, checkout, env, timeout=args.explore_budget + 900)
    took = time.monotonic() - started
    output = result.stdout + result.stderr
    match = re.search(r"kaizen: explored \d+ completion\(s\): (\d+) alternative\(s\) judged.*? in "
                      r"([\d.]+) s", output)  # fmt: skip
    if match is None:
        return output, took, 0.0, 0
    return output, took, float(match[2]), int(match[1])


@dataclass
class Project:
    """A project ready for traffic: its checkout, venv, the tests that failed before any change
    (deselected from then on) and the functions its tests execute, in a seeded order."""

    spec: Spec
    checkout: Path
    python: Path
    failing: list[str]
    targets: list[Target]

    @property
    def repository(self) -> str:
        return f"pypi.org/project/{self.spec.name.lower()}"


def open_project(
    spec: Spec, work: Path, *, mode: str, seed: int, pytest_requirement: str = "pytest"
) -> Project:
    checkout, python = prepare(spec, work, pytest_requirement)
    covered, failing = baseline(checkout, python)
    found = targets(checkout, covered, mode)
    random.Random(f"{seed}:{spec.name}").shuffle(found)
    return Project(spec, checkout, python, failing, found)


def masked(
    project: Project, target: Target, prefix_chars: int, suffix_chars: int
) -> tuple[str, str]:
    """The extension's prompt for ``target``: the window around the masked region."""
    original = (project.checkout / target.file_path).read_text(encoding="utf-8")
    return window(
        original[: target.start] + original[target.end :], target.start, prefix_chars, suffix_chars
    )


def tests_pass(project: Project, timeout: float = 900) -> bool:
    """The project's own tests (less those failing before any change), plain pytest, stopping
    at the first failure: whether the checkout as it is now passes."""
    command = [str(project.python), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               "-p", "no:kaizen"]  # fmt: skip
    for node in project.failing:
        command += ["--deselect", node]
    try:
        return _run(command, project.checkout, _pytest_env(), timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def evaluate_targets(
    generator: Any,
    items: list[tuple[Project, Target]],
    *,
    suite: str,
    adapter: Path | None,
    mode: str,
    max_tokens: int,
    prefix_chars: int = PREFIX_CHARS,
    suffix_chars: int = SUFFIX_CHARS,
) -> Any:
    """Greedy pass@1 of ``adapter`` (None: the base) on masked functions of real projects: one
    completion each (the extension's window, offline through ``generator`` so that evaluation
    leaves no records to train on), spliced in, the project's tests run, the file restored.
    Returns a :class:`trainer.evaluate.EvalResult` (paired comparisons: ``compare``)."""
    from server.engine.fim import block_stops
    from trainer.evaluate import EvalResult
    from trainer.generate import GenerationRequest

    started = time.perf_counter()
    requests = []
    for project, target in items:
        prefix, suffix = masked(project, target, prefix_chars, suffix_chars)
        stop = tuple(block_stops(prefix, "python"))  # as the server adds to the extension's
        requests.append(
            GenerationRequest(prompt=prefix, suffix=suffix, single_line=mode == "line", stop=stop)
        )
    texts = generator.generate(
        requests, adapter=adapter, n=1, temperature=0.0, max_tokens=max_tokens, progress=True
    )
    passed, completions, ids = [], [], []
    for (project, target), row in zip(items, texts, strict=True):
        text = row[0] if row else ""
        path = project.checkout / target.file_path
        original = path.read_text(encoding="utf-8")
        try:
            path.write_text(original[: target.start] + text + original[target.end :], "utf-8")
            passed.append(bool(text.strip()) and tests_pass(project))
        finally:
            path.write_text(original, encoding="utf-8")
        completions.append(text)
        ids.append(f"{project.spec.name}:{target.file_path}:{target.function}:{target.start}")
    return EvalResult(
        suite=suite,
        adapter=str(adapter) if adapter else None,
        task_ids=ids,
        passed=passed,
        completions=completions,
        duration_s=round(time.perf_counter() - started, 1),
    )


def bench_project(spec: Spec, api: Api, args: argparse.Namespace, work: Path) -> ProjectResult:
    project = open_project(
        spec, work, mode=args.mode, seed=args.seed, pytest_requirement=args.pytest_requirement
    )
    return bench_targets(project, project.targets[: args.per_project], api, args)


def bench_targets(
    project: Project,
    chosen: list[Target],
    api: Api,
    args: argparse.Namespace,
    model: str | None = None,
    tag: str = "",
) -> ProjectResult:
    """Traffic on ``chosen`` functions of ``project``, as the module docstring describes."""
    spec, checkout, python, failing = (
        project.spec,
        project.checkout,
        project.python,
        project.failing,
    )
    result = ProjectResult(spec.name, spec.version)
    result.functions_covered = len(project.targets)
    repository = project.repository
    for i, target in enumerate(chosen):
        path = checkout / target.file_path
        original = path.read_text(encoding="utf-8")
        suffix_full = original[target.end :]
        prefix, masked_suffix = window(
            original[: target.start] + suffix_full,
            target.start,
            args.prefix_chars,
            args.suffix_chars,
        )
        answer = api.complete(
            {
                "model": model or args.model,
                "prompt": prefix,
                "suffix": masked_suffix,
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "single_line": args.mode == "line",
                "context": {
                    "language": "python",
                    "file_path": target.file_path,
                    "repository": repository,
                },
            }  # fmt: skip
        )
        if isinstance(answer, str):
            result.refused[answer] += 1
            continue
        cid, text = answer["id"], answer["choices"][0]["text"]
        if not text.strip():
            result.empty += 1  # the extension shows nothing: nothing to accept
            continue
        try:
            path.write_text(original[: target.start] + text + suffix_full, encoding="utf-8")
            entry = {"completion_id": cid, "repository": repository,
                     "file_path": target.file_path, "inserted_text": text, "current_text": text,
                     "start_offset": target.start}  # fmt: skip
            api.accept(cid, entry)
            result.completions += 1
            result.completion_ids.append(cid)
            run_id = f"repos:{spec.name}:{tag}{i}:{uuid.uuid4().hex[:8]}"
            _out, took, explored, judged = run_tests(
                api, checkout, python, run_id, failing, args, args.explore
            )
            result.test_seconds += took
            result.explore_seconds += explored
            result.alternatives_judged += judged
            mine = [o for o in api.outcomes(cid) if o["run_id"] == run_id]
            if not mine:
                result.statuses["none"] += 1
                continue
            status = mine[0]["status"]
            result.statuses[status] += 1
            if mine[0]["tests"]:
                result.per_test += 1
            else:
                result.run_level += 1
            if args.fix and status in ("failed", "build_failed"):
                body = original[target.start : target.end]
                path.write_text(original, encoding="utf-8")
                api.ledger({**entry, "current_text": body,
                            "updated_at": datetime.now(UTC).isoformat()})  # fmt: skip
                run_tests(api, checkout, python, run_id + ":fix", failing, args, 0)
                result.fixed += 1
        finally:
            path.write_text(original, encoding="utf-8")
    return result


def pairs_by_project(database_url: str, results: list[ProjectResult]) -> dict[str, Counter[str]]:
    """The trainer's pairs over these completions and the alternatives CI judged for them."""
    from server.store.db import make_engine, make_session_factory
    from trainer.pairs import build_pairs
    from trainer.records import load_outcome_records
    from trainer.sandbox import Sandbox

    owner = {cid: r.name for r in results for cid in r.completion_ids}
    factory = make_session_factory(make_engine(database_url))
    with factory() as session:
        records = load_outcome_records(session=session)
    mine = [r for r in records if r.completion_id in owner or r.parent_id in owner]
    project_of = {
        r.context_key: owner.get(r.completion_id) or owner.get(r.parent_id or "") for r in mine
    }
    built = build_pairs(mine, sandbox=Sandbox(), max_token_share=1.0)
    counts: dict[str, Counter[str]] = {r.name: Counter() for r in results}
    for info in built.info.values():
        name = project_of.get(info.context_key)
        if name is not None:
            counts[name][info.source] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--database-url", required=True, help="the server's database")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--project", action="append", type=Spec.parse, metavar="NAME==VERSION")
    parser.add_argument("--per-project", type=int, default=10)
    parser.add_argument("--mode", choices=("body", "line"), default="body")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prefix-chars", type=int, default=PREFIX_CHARS, help="the extension's")
    parser.add_argument("--suffix-chars", type=int, default=SUFFIX_CHARS, help="the extension's")
    parser.add_argument("--explore", type=int, default=1, help="--kaizen-explore N")
    parser.add_argument("--explore-k", type=int, default=4)
    parser.add_argument("--explore-budget", type=float, default=120.0)
    parser.add_argument("--fix", action="store_true", help="a developer fix after a failure")
    parser.add_argument(
        "--pytest-requirement", default="pytest", help="pytest for the projects' venvs"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="where to keep checkouts and venvs")
    args = parser.parse_args(argv)
    tokens = {r: os.environ.get(f"KAIZEN_{r.upper()}_TOKEN", "") for r in ("ide", "ci", "ops")}
    if not all(tokens.values()):
        parser.error("set KAIZEN_IDE_TOKEN, KAIZEN_CI_TOKEN and KAIZEN_OPS_TOKEN")
    api = Api(args.url, tokens["ide"], tokens["ci"], tokens["ops"])
    specs = args.project or [Spec.parse(p) for p in DEFAULT_PROJECTS]
    work = args.work or Path(tempfile.mkdtemp(prefix="kaizen-repos-"))
    results = []
    for spec in specs:
        try:
            results.append(bench_project(spec, api, args, work / f"{spec.name}-{spec.version}"))
        except Exception as exc:  # one broken project does not end the benchmark
            failed = ProjectResult(spec.name, spec.version, error=f"{type(exc).__name__}: {exc}")
            results.append(failed)
        print(f"{spec.name}: {results[-1].to_dict()}", file=sys.stderr, flush=True)
    pairs = pairs_by_project(args.database_url, results)
    header = ("project", "accepted", "pass %", "per test", "run level", "ci", "fix",
              "ci_resample", "pairs/100", "explore s")  # fmt: skip
    rows = []
    for r in results:
        verdicts = r.statuses["passed"] + r.statuses["failed"] + r.statuses["build_failed"]
        total = sum(pairs[r.name].values())
        rows.append((
            f"{r.name}=={r.version}", r.completions,
            f"{100 * r.statuses['passed'] / verdicts:.0f}" if verdicts else "-",
            r.per_test, r.run_level, pairs[r.name]["ci"], pairs[r.name]["fix"],
            pairs[r.name]["ci_resample"],
            f"{100 * total / r.completions:.0f}" if r.completions else "-",
            f"{r.explore_seconds:.0f}",
        ))  # fmt: skip
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"repos-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "projects": [
                    {**r.to_dict(), "pairs_by_source": dict(pairs[r.name])} for r in results
                ],
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
