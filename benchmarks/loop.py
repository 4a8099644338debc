"""The whole loop, measured: simulated users on MBPP+'s train split, training rounds through the
product, and held-out pass@1 before and after each round.

Per round k (1..``--rounds``):

1. ``kaizen serve`` (a subprocess, the bundled model; from round 2 on with round k-1's adapter
   loaded and requested by the simulated users) takes ``--samples`` fill-in-the-middle requests
   per train task from ``benchmarks/simulate.py``, whose CI runs the tests in the sandbox and
   reports the outcomes with their test code;
2. the server stops (the trainer gets the cores) and :func:`trainer.round.run_round` runs: pairs
   from the outcomes (resampling with round k-1's adapter where a task has only one side),
   CDAS selection, DPO+NLL continuing from round k-1's adapter, a candidate in the registry;
3. greedy pass@1 of the new adapter on the held-out suites, paired against the base (exact
   McNemar test), in the sandbox.

Held-out suites: MBPP+'s ``test`` split (never simulated, never trained on) and HumanEval.
``--eval-mbpp N`` / ``--eval-humaneval N`` take a seeded subset of N tasks (0: all) for a
reduced run; the task ids are recorded. Prints a table and writes JSON to
``benchmarks/results/loop-<timestamp>.json`` after every stage, so a cut-short run keeps what
it measured.

With ``--traffic repos`` the users work on real projects instead (``benchmarks/repos.py``):
the train projects' covered functions are masked and asked for as the VS Code extension asks,
accepted, and the project's own tests run under pytest-kaizen with CI-side exploration
(``--explore``, ``--explore-k``) and, with ``--fix``, a developer fix after a failure. The
held-out suites are then ``repo_functions`` (the first ``--held-out-functions`` covered
functions of each train project, never asked for) and ``repo_projects`` (as many of each
``--held-out-project``, never trained on), judged by the projects' own tests and paired
against the base as above. Reduced, on a 2-core CPU::

    .venv/bin/python benchmarks/loop.py --traffic repos --rounds 1 \
        --project toolz==1.0.0 --project more-itertools==10.5.0 \
        --held-out-project inflection==0.5.1 --per-project 8 --held-out-functions 10 \
        --mode line --max-tokens 64 --explore 1 --explore-k 4 --fix --resample 0 \
        --min-pairs 2 --max-steps 6 --batch-size 4 --learning-rate 5e-5 --warmup-steps 1

The same command without the size options runs the full loop on a GPU host.

The full run (GPU host)::

    .venv/bin/python benchmarks/loop.py --rounds 2

The reduced run on a 2-core CPU (what the closing note reports)::

    .venv/bin/python benchmarks/loop.py --rounds 2 --train-tasks 40 --samples 4 \\
        --eval-mbpp 0 --eval-humaneval 40 --resample 4 --max-steps 10 --batch-size 8 \\
        --learning-rate 5e-5 --warmup-steps 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `trainer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    LOOPBACK,
    REPO_ROOT,
    RESULTS_DIR,
    ServerProcess,
    kaizen_command,
    resolve_model,
    utc_stamp,
)
from benchmarks.repos import (
    DEFAULT_PROJECTS,
    Api,
    Project,
    Spec,
    Target,
    bench_targets,
    open_project,
)
from benchmarks.repos import evaluate_targets as evaluate_repo_targets
from benchmarks.simulate import DEFAULT_DATA, simulate
from server.config import Settings
from server.store.db import make_engine, make_session_factory, upgrade
from server.store.tokens import Role, create_token
from trainer.config import TrainConfig
from trainer.evaluate import EvalResult, compare, evaluate, load_suite
from trainer.gate import GateConfig
from trainer.generate import vllm_generator_factory
from trainer.round import RoundOptions, RoundReport, run_round
from trainer.sandbox import Sandbox
from trainer.stats import lower_bound
from trainer.tasks import Task, load_mbpp

log = logging.getLogger("benchmarks.loop")

SUITES = ("mbpp_test", "humaneval", "repo_functions", "repo_projects")
# --traffic repos: the train projects' traffic and held-out suites (pinned in benchmarks/repos.py)
REPO_TRAIN = DEFAULT_PROJECTS[:4]
REPO_HELD_OUT = DEFAULT_PROJECTS[4:]


def _subset(tasks: list[Task], n: int, seed: int) -> list[Task]:
    if n <= 0 or n >= len(tasks):
        return tasks
    picked = random.Random(seed).sample(range(len(tasks)), n)
    return [tasks[i] for i in sorted(picked)]


def _gate_bound(base: EvalResult, after: EvalResult) -> dict[str, float]:
    """The gate's own statistic on the paired gains (trainer.stats.lower_bound, one problem per
    task, at the level of one gating round): mean gain and its one-sided lower bound, points."""
    level = GateConfig().alpha
    diffs = [float(a) - float(b) for b, a in zip(base.passed, after.passed, strict=True)]
    bound = lower_bound(diffs, level)
    return {
        "gate_gain_points": round(100 * float(bound.mean), 2),
        "gate_lower_bound_points": round(100 * float(bound.lower), 2),
        "gate_level": level,
    }


def _item_id(item: Any) -> str:
    """A suite item's id: an MBPP+/HumanEval task, or a (project, function) of --traffic repos."""
    if isinstance(item, tuple):
        project, target = item
        return f"{project.spec.name}:{target.file_path}:{target.function}:{target.start}"
    return str(item.task_id)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class Loop:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.home = Path(args.home or RESULTS_DIR / f"loop-{utc_stamp()}").resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        cache = Path(args.model_cache).expanduser() if args.model_cache else None
        self.settings = Settings(
            _env_file=None,
            home=self.home,
            model_cache=cache or Settings(_env_file=None).model_cache,  # type: ignore[call-arg]
        )
        self.model_dir = resolve_model(
            self.settings.model, model_cache=self.settings.model_cache
        ).path
        upgrade(self.settings.database_url)
        _setup_logging()  # Alembic's logging config turned ours off
        self.db = make_engine(self.settings.database_url)
        self.factory = make_session_factory(self.db)
        with self.factory() as session:
            self.tokens = {
                role: create_token(session=session, name=f"loop-{role.value}", role=role)[1]
                for role in (Role.IDE, Role.CI, Role.OPS)
            }
        self.sandbox = Sandbox(workers=2)
        data = Path(args.data)
        self.train_tasks: list[Task] = []
        self.suites: dict[str, list[Any]] = {}
        self.repo_traffic: list[tuple[Project, list[Target]]] = []
        if args.traffic == "mbpp":
            self.train_tasks = load_mbpp(data, "train")[: args.train_tasks or None]
            self.suites = {
                "mbpp_test": _subset(load_suite("mbpp_test", mbpp_path=data), args.eval_mbpp, 1),
                "humaneval": _subset(
                    load_suite("humaneval", mbpp_path=data), args.eval_humaneval, 2
                ),
            }
        else:
            self._open_repos()
        self.results: dict[str, Any] = {
            "command": " ".join(sys.argv),
            "home": str(self.home),
            "model_dir": str(self.model_dir),
            "train_tasks": [t.task_id for t in self.train_tasks],
            "suites": {name: [_item_id(t) for t in items] for name, items in self.suites.items()},
            "repo_traffic": {
                p.spec.name: [_item_id((p, t)) for t in chosen] for p, chosen in self.repo_traffic
            },
            "evaluations": {},
            "rounds": [],
        }
        self.out = Path(args.out) if args.out else RESULTS_DIR / f"loop-{utc_stamp()}.json"

    def _open_repos(self) -> None:
        """Each project in its own venv; per train project, the first ``--held-out-functions``
        of its covered functions (seeded order) are held out and the next ``--per-project``
        are the traffic; held-out projects give ``--held-out-functions`` each and no traffic."""
        a = self.args
        work = self.home / "repos"
        opened: dict[str, Project] = {}
        for text in [*a.project, *a.held_out_project]:
            spec = Spec.parse(text)
            opened[text] = open_project(
                spec, work / f"{spec.name}-{spec.version}", mode=a.mode, seed=a.seed
            )
            log.info("event=project_ready project=%s functions=%d", spec.name,
                     len(opened[text].targets))  # fmt: skip
        held_fn, held_proj = [], []
        for text in a.project:
            project = opened[text]
            held_fn += [(project, t) for t in project.targets[: a.held_out_functions]]
            traffic = project.targets[a.held_out_functions : a.held_out_functions + a.per_project]
            self.repo_traffic.append((project, traffic))
        for text in a.held_out_project:
            project = opened[text]
            held_proj += [(project, t) for t in project.targets[: a.held_out_functions]]
        self.suites = {"repo_functions": held_fn, "repo_projects": held_proj}

    # -- stages -------------------------------------------------------------------------------

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def generator(self) -> Any:
        return vllm_generator_factory(self.settings, self.model_dir)()

    def evaluate(self, label: str, adapter: Path | None) -> dict[str, EvalResult]:
        started = time.perf_counter()
        out = {}
        with self.generator() as generator:
            for name, tasks in self.suites.items():
                if not tasks:
                    continue
                if name.startswith("repo_"):
                    out[name] = evaluate_repo_targets(
                        generator,
                        tasks,
                        suite=name,
                        adapter=adapter,
                        mode=self.args.mode,
                        max_tokens=self.args.max_tokens,
                    )
                else:
                    out[name] = evaluate(
                        generator,
                        tasks,
                        suite=name,
                        sandbox=self.sandbox,
                        adapter=adapter,
                        max_tokens=self.args.max_tokens,
                    )
                log.info(
                    "event=eval label=%s suite=%s pass@1=%.3f", label, name, out[name].pass_at_1
                )
        self.results["evaluations"][label] = {name: r.to_json() for name, r in out.items()} | {
            "duration_s": round(time.perf_counter() - started, 1)
        }
        self.save()
        return out

    def traffic(self, k: int, adapter: tuple[str, Path] | None) -> dict[str, Any]:
        port = _free_port()
        env = {
            **os.environ,
            "KAIZEN_HOME": str(self.home),
            "KAIZEN_MODEL_CACHE": str(self.settings.model_cache),
            "KAIZEN_PORT": str(port),
            "KAIZEN_DATABASE_URL": self.settings.database_url,
            "KAIZEN_ADAPTERS": json.dumps({adapter[0]: str(adapter[1])} if adapter else {}),
        }
        server = ServerProcess(
            "kaizen serve",
            [*kaizen_command(), "serve"],
            env=env,
            cwd=REPO_ROOT,
            log_path=self.home / f"server-round{k}.log",
        )
        url = f"http://{LOOPBACK}:{port}"
        try:
            server.wait_ready(f"{url}/readyz", timeout=900)
            if self.args.traffic == "repos":
                return self._repo_traffic(k, url, adapter[0] if adapter else None)
            result = simulate(
                url=url,
                ide_token=self.tokens[Role.IDE],
                ci_token=self.tokens[Role.CI],
                tasks=self.train_tasks,
                samples=self.args.samples,
                temperature=self.args.temperature,
                max_tokens=self.args.max_tokens,
                seed=1000 * k,
                concurrency=self.args.concurrency,
                repository="sim/mbpp",
                fix_rate=self.args.fix_rate,
                sandbox=self.sandbox,
                model=adapter[0] if adapter else None,
            )
        finally:
            server.stop()
        summary = {k: v for k, v in result.to_dict().items() if k != "rows"}
        log.info("event=traffic round=%d %s", k, summary)
        return summary

    def _repo_traffic(self, k: int, url: str, model: str | None) -> dict[str, Any]:
        """The train projects' traffic through the running server (benchmarks/repos.py: the
        extension's requests, the project's tests under pytest-kaizen with exploration)."""
        api = Api(url, self.tokens[Role.IDE], self.tokens[Role.CI], self.tokens[Role.OPS])
        out: dict[str, Any] = {}
        for project, chosen in self.repo_traffic:
            result = bench_targets(project, chosen, api, self.args, model=model, tag=f"r{k}-")
            out[project.spec.name] = {
                key: value for key, value in result.to_dict().items() if key != "completion_ids"
            }
            log.info("event=repo_traffic round=%d project=%s %s", k, project.spec.name,
                     out[project.spec.name])  # fmt: skip
        return out

    def round(self, k: int, parent: str | None) -> RoundReport:
        a = self.args
        config = TrainConfig(
            max_steps=a.max_steps,
            batch_size=a.batch_size,
            gradient_accumulation=a.gradient_accumulation,
            epochs=a.epochs,
            learning_rate=a.learning_rate,
            warmup_steps=a.warmup_steps,
            seed=k,
        )
        options = RoundOptions(
            n_resample=a.resample,
            seed=k,
            min_pairs=a.min_pairs,
            select_fraction=a.select_fraction,
        )
        return run_round(
            session_factory=self.factory,
            base_model_dir=self.model_dir,
            rounds_dir=self.settings.rounds_dir or self.home / "rounds",
            config=config,
            options=options,
            generator_factory=self.generator,
            parent=parent,
            trigger="manual",
        )

    def run(self) -> int:
        base = self.evaluate("base", None)
        parent: tuple[str, Path] | None = None
        for k in range(1, self.args.rounds + 1):
            entry: dict[str, Any] = {"round": k, "parent": parent[0] if parent else None}
            self.results["rounds"].append(entry)
            entry["traffic"] = self.traffic(k, parent)
            self.save()
            report = self.round(k, parent[0] if parent else None)
            entry["report"] = asdict(report)
            self.save()
            if report.status != "succeeded" or report.adapter_dir is None:
                log.error(
                    "event=round_not_succeeded round=%d status=%s error=%s",
                    k,
                    report.status,
                    report.error,
                )
                break
            assert report.adapter_name is not None
            manifest = json.loads((report.adapter_dir / "manifest.json").read_text())
            entry["manifest"] = {k2: v for k2, v in manifest.items() if k2 != "record_ids"}
            entry["manifest"]["record_ids_count"] = len(manifest.get("record_ids", []))
            after = self.evaluate(f"round{k}", report.adapter_dir)
            entry["comparison_vs_base"] = {
                name: {
                    **asdict(compare(base[name], after[name])),
                    **_gate_bound(base[name], after[name]),
                }
                for name in after
            }
            if k > 1:
                before = self.results["evaluations"][f"round{k - 1}"]
                entry["comparison_vs_previous"] = {
                    name: asdict(compare(EvalResult.from_json(before[name]), after[name]))
                    for name in after
                }
            self.save()
            parent = (report.adapter_name, report.adapter_dir)
        print_table(self.results)
        print(f"\nresults: {self.out}")
        return 0


def print_table(results: dict[str, Any]) -> None:
    evals = results["evaluations"]
    labels = list(evals)
    print()
    width = max(len(s) for s in ("suite", *evals.get("base", {})))
    header = f"{'suite':<{width}} {'tasks':>5} " + " ".join(f"{label:>10}" for label in labels)
    print(header)
    print("-" * len(header))
    for suite in SUITES:
        if suite not in evals.get("base", {}):
            continue
        n = evals["base"][suite]["n"]
        cells = []
        for label in labels:
            r = evals[label][suite]
            cells.append(f"{100 * r['pass_at_1']:>9.1f}%")
        print(f"{suite:<{width}} {n:>5} " + " ".join(cells))
    # Beside pass@1: the share whose program parses, resolves its API use and runs (a pass is).
    print(f"\nexecutability rate ({', '.join(labels)})")
    for suite in SUITES:
        if suite not in evals.get("base", {}):
            continue
        rates = [evals[label][suite].get("executability_rate") for label in labels]
        cells = [f"{'-':>10}" if x is None else f"{100 * x:>9.1f}%" for x in rates]
        print(f"{suite:<{width}} {evals['base'][suite]['n']:>5} " + " ".join(cells))
    for entry in results["rounds"]:
        comparison = entry.get("comparison_vs_base")
        if not comparison:
            continue
        print(f"\nround {entry['round']} vs base:")
        for suite, c in comparison.items():
            delta = 100 * (c["candidate_passed"] - c["base_passed"]) / max(c["n"], 1)
            bound = c.get("gate_lower_bound_points")
            gate = f"  gate's lower bound {bound:+.1f} points" if bound is not None else ""
            print(
                f"  {suite:<{width}} {delta:+6.1f} points  wins {c['wins']:>3}  losses "
                f"{c['losses']:>3}  McNemar p={c['p_value']:.3f}{gate}"
            )
        report = entry.get("report", {})
        funnel = report.get("funnel", {})
        pairs = funnel.get("pairs", {})
        selected = funnel.get("selection", {}).get("selected")
        steps = report.get("metrics", {}).get("steps")
        print(
            f"  funnel: outcomes {funnel.get('outcome_records')}, pairs {pairs.get('pairs')} "
            f"{pairs.get('pairs_by_source')}, selected {selected}, "
            f"trained {funnel.get('trained_pairs')}; steps {steps}"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data", default=os.environ.get("KAIZEN_MBPP_PATH", str(DEFAULT_DATA)))
    p.add_argument("--home", help="Working directory (database, rounds, logs); default: new.")
    p.add_argument("--model-cache", help="Where the bundled model is (default: ~/.kaizen/models).")
    p.add_argument("--train-tasks", type=int, default=0, help="First N train tasks (0: all).")
    p.add_argument("--samples", type=int, default=4, help="IDE requests per train task.")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--fix-rate", type=float, default=0.0)
    p.add_argument("--eval-mbpp", type=int, default=0, help="Seeded subset size (0: all).")
    p.add_argument("--eval-humaneval", type=int, default=0, help="Seeded subset size (0: all).")
    p.add_argument("--resample", type=int, default=8)
    p.add_argument("--min-pairs", type=int, default=4, help="Fewer pairs: the round is skipped.")
    p.add_argument("--select-fraction", type=float, default=0.5, help="CDAS share per cluster.")
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gradient-accumulation", type=int, default=1)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--out", help="JSON results path.")
    p.add_argument(
        "--traffic",
        choices=("mbpp", "repos"),
        default="mbpp",
        help="mbpp: simulated users on MBPP+ (CI in the sandbox); repos: real projects' own "
        "test suites as CI (benchmarks/repos.py), held-out functions and projects as suites.",
    )
    r = p.add_argument_group("--traffic repos")
    names = {key: ", ".join(x.split(":")[0] for x in v)
             for key, v in (("train", REPO_TRAIN), ("held", REPO_HELD_OUT))}  # fmt: skip
    r.add_argument("--project", action="append", metavar="NAME==VERSION[:SHA256]",
                   help=f"Train project (repeatable; default {names['train']}).")  # fmt: skip
    r.add_argument("--held-out-project", action="append", metavar="NAME==VERSION[:SHA256]",
                   help=f"Never trained on (default {names['held']}).")  # fmt: skip
    r.add_argument("--per-project", type=int, default=10, help="Traffic functions per project.")
    r.add_argument("--held-out-functions", type=int, default=10, help="Per project, held out.")
    r.add_argument("--mode", choices=("body", "line"), default="body")
    r.add_argument("--explore", type=int, default=1, help="pytest --kaizen-explore N")
    r.add_argument("--explore-k", type=int, default=4)
    r.add_argument("--explore-budget", type=float, default=120.0)
    r.add_argument("--fix", action="store_true", help="a developer fix after a failure")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="the served name")
    r.add_argument("--prefix-chars", type=int, default=3000)
    r.add_argument("--suffix-chars", type=int, default=1000)
    return p


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        force=True,  # vLLM and Alembic configure logging of their own
    )


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = _parser().parse_args(argv)
    if args.traffic == "repos":
        args.project = args.project or list(REPO_TRAIN)
        args.held_out_project = args.held_out_project or list(REPO_HELD_OUT)
    return Loop(args).run()


if __name__ == "__main__":
    sys.exit(main())
