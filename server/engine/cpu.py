"""The CPU cores an engine runs on (both engines: vLLM binds its OpenMP threads to them,
llama.cpp's worker thread and the threads it starts are pinned to them)."""

from __future__ import annotations

import os
from pathlib import Path


def usable_cores() -> list[int]:
    """The CPUs this process may run on, one per physical core (SMT siblings share a core's
    arithmetic units, so vLLM's own auto binding also takes one logical CPU per core)."""
    allowed = sorted(os.sched_getaffinity(0))
    seen: dict[tuple[str, str], int] = {}
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key = (
                (topology / "physical_package_id").read_text().strip(),
                (topology / "core_id").read_text().strip(),
            )
        except OSError:
            key = ("?", str(cpu))
        seen.setdefault(key, cpu)
    return sorted(seen.values())


def parse_core_list(spec: str) -> list[int]:
    """``"0-3,6"`` -> ``[0, 1, 2, 3, 6]``; raises ValueError with what is wrong."""
    cores: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(
                f"{spec!r} is not a CPU list: write core ids and ranges such as '0-3,6'"
            ) from None
        if first > last:
            raise ValueError(f"{spec!r}: the range {part} runs backwards")
        cores.update(range(first, last + 1))
    if not cores:
        raise ValueError(f"{spec!r} names no core")
    return sorted(cores)


def choose_cores(spec: str, *, role: str, shared: bool, available: list[int]) -> list[int]:
    """The cores an engine binds to. ``spec`` is ``"auto"`` or a CPU list. With ``auto``, an
    engine alone on the host takes every core; when the server and the trainer's generator
    share it (``shared``), the server takes the lower half and the generator the upper half, so
    the two never run their threads on the same core."""
    if spec.strip().lower() != "auto":
        cores = parse_core_list(spec)
        outside = sorted(set(cores) - set(os.sched_getaffinity(0)))
        if outside:
            raise ValueError(
                f"cores {outside} of {spec!r} are not available to this process "
                f"(it may use {sorted(os.sched_getaffinity(0))})"
            )
        return cores
    if not shared or len(available) < 2:
        return list(available)
    half = (len(available) + 1) // 2
    return available[:half] if role == "server" else available[half:]
