"""Engine processes: they die with the server, however it dies, and they bind to the cores
the settings give them (disjoint for the server and the trainer's generator on one host)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import psutil
import pytest

from server.engine.cpu import choose_cores, parse_core_list, usable_cores
from server.store.db import upgrade
from tests.integration.conftest import TinyWorld, start_server_process


def test_core_lists_parse_and_refuse_nonsense() -> None:
    assert parse_core_list("0-3,6, 8") == [0, 1, 2, 3, 6, 8]
    for bad in ("", "a-b", "3-1"):
        with pytest.raises(ValueError):
            parse_core_list(bad)


def test_auto_cores_split_between_server_and_trainer_only_when_shared() -> None:
    cores = [0, 1, 2, 3, 4]
    assert choose_cores("auto", role="server", shared=False, available=cores) == cores
    assert choose_cores("auto", role="trainer", shared=False, available=cores) == cores
    server = choose_cores("auto", role="server", shared=True, available=cores)
    trainer = choose_cores("auto", role="trainer", shared=True, available=cores)
    assert server == [0, 1, 2] and trainer == [3, 4]
    # One core cannot be split: both get it rather than none.
    assert choose_cores("auto", role="trainer", shared=True, available=[0]) == [0]


def test_explicit_cores_must_be_available() -> None:
    mine = sorted(os.sched_getaffinity(0))
    assert choose_cores(str(mine[0]), role="server", shared=True, available=mine) == [mine[0]]
    with pytest.raises(ValueError, match="not available"):
        choose_cores(str(max(mine) + 1000), role="server", shared=False, available=mine)


@pytest.mark.engine
def test_kill_9_of_the_server_leaves_no_engine_process(
    tiny_world: TinyWorld, tmp_path: Path
) -> None:
    """Twice seen: the server SIGKILLed, its vLLM engine core (about 4.7 GB with the real
    model) still alive 75 s later; a crash loop then ran the host out of memory."""
    db_url = f"sqlite:///{tmp_path / 'kaizen.db'}"
    upgrade(db_url)
    # Shared with a trainer: the server's engine takes the lower half of the cores.
    server = start_server_process(
        tiny_world, tmp_path, db_url, KAIZEN_CPU_SHARED_WITH_TRAINER="true"
    )
    children: list[psutil.Process] = []
    try:
        server.wait_ready()
        children = psutil.Process(server.proc.pid).children(recursive=True)
        assert children, "vLLM runs its engine core in a child process"
        cores = usable_cores()
        expected = cores[: (len(cores) + 1) // 2] if len(cores) > 1 else cores
        bound = _bound_cores(children)
        assert bound == set(expected), (bound, expected, server.log()[-3000:])

        server.proc.kill()
        server.proc.wait(30)
        _, alive = psutil.wait_procs(children, timeout=20)
        left = [
            (p.pid, p.name())
            for p in alive
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]
        assert not left, f"engine processes outlived the server: {left}"
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        for child in children:  # never leave GBs behind, even when the test fails
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


def _bound_cores(processes: list[psutil.Process]) -> set[int]:
    """The cores that threads of ``processes`` are pinned to: vLLM's OpenMP binding pins each
    worker thread to one core, so the set is the engine's cores, read from the kernel rather
    than from a log line."""
    cores: set[int] = set()
    everything = set(os.sched_getaffinity(0))
    for process in processes:
        try:
            threads = [t.id for t in process.threads()]
        except psutil.Error:
            continue
        for tid in threads:
            try:
                affinity = os.sched_getaffinity(tid)
            except OSError:
                continue
            if affinity != everything:
                cores |= affinity
    return cores


_GENERATOR = """
import sys, time
sys.path.insert(0, {repo!r})
from trainer.generate import VllmGenerator, GenerationRequest

if __name__ == "__main__":
    gen = VllmGenerator({model!r}, max_model_len=256, kv_cache_gib=0.0625, enforce_eager=True,
                        cpu_cores="auto", cpu_shared=True)
    print("texts", gen.generate([GenerationRequest("def f0():")], max_tokens=4), flush=True)
    print("ready", flush=True)
    time.sleep(3600)
"""


@pytest.mark.engine
def test_the_trainers_generator_takes_the_upper_cores_and_dies_with_its_process(
    tiny_world: TinyWorld, tmp_path: Path
) -> None:
    import subprocess
    import sys

    script = tmp_path / "generator.py"
    repo = Path(__file__).resolve().parents[2]
    script.write_text(_GENERATOR.format(repo=str(repo), model=str(tiny_world.model_dir)))
    log_path = tmp_path / "generator.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=log, stderr=log, env=env)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 600
        while "ready" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the generator did not start"
            time.sleep(0.5)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children
        cores = usable_cores()
        expected = cores[(len(cores) + 1) // 2 :] if len(cores) > 1 else cores
        bound = _bound_cores(children)
        assert bound == set(expected), (bound, expected, log_path.read_text()[-3000:])
        proc.kill()
        proc.wait(30)
        _, alive = psutil.wait_procs(children, timeout=20)
        left = [p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"engine processes outlived the trainer: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
