"""benchmarks/latency.py's own parts: the typed lines are HumanEval's masked lines, keystrokes
share the file's prefix, and the peer is asked for what Kaizen's service would generate."""

from __future__ import annotations

from benchmarks.latency import EditorTask, Target, keystroke_prefixes, load_tasks
from trainer.sandbox import Sandbox


def test_the_typed_line_is_the_masked_canonical_line() -> None:
    tasks = load_tasks(3)
    assert len(tasks) == 3
    runs = Sandbox().run_tests([(t.program(t.line), t.test) for t in tasks])
    assert all(r.passed for r in runs), [r for r in runs if not r.passed]
    assert not any(
        r.passed for r in Sandbox().run_tests([(t.program("pass"), t.test) for t in tasks])
    )


def test_keystrokes_extend_one_prefix() -> None:
    task = EditorTask("t", "def f():\n    ", "\n", "", "return sorted(x)")
    prefixes = keystroke_prefixes(task, every=4, most=3)
    assert prefixes == [task.prefix, task.prefix + "retu", task.prefix + "return s"]


def test_the_peer_gets_kaizens_prompt_and_stops() -> None:
    prefix, suffix = "def f(x):\n    ", "\n    return y\n"
    kaizen = Target("kaizen", "http://k", "m", "secret", "kaizen").body(
        prefix, suffix, single_line=True, max_tokens=48
    )
    assert kaizen["prompt"] == prefix and kaizen["suffix"] == suffix and kaizen["single_line"]
    peer = Target("llama.cpp", "http://p", "peer", None, "openai").body(
        prefix, suffix, single_line=True, max_tokens=48
    )
    assert peer["prompt"] == f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    assert peer["stop"] == ["\n    return y", "return y", "\n    return ", "\n"]
    assert Target("llama.cpp", "", "", None, "openai").headers() == {}
