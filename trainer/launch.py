"""One training step of a round in several processes: ``accelerate launch`` around
:func:`trainer.train.train_adapter`, data-parallel (DDP: one process per GPU, each its share of
every batch, gradients averaged).

:func:`train_adapter_launched` takes ``train_adapter``'s keyword arguments plus ``num_processes``
(``KAIZEN_TRAIN_NUM_PROCESSES``). With 1 it is ``train_adapter`` in this process (the CPU path,
unchanged). With N > 1 it writes the arguments to ``output_dir/launch-args.json`` and runs::

    python -m accelerate.commands.launch --multi_gpu --num_processes N ... -m trainer.launch ARGS

Each process runs ``train_adapter``; the main one (rank 0) alone clears the checkpoints folder,
saves the adapter with its manifest and writes ``output_dir/launch-result.json``, which is read
back as the :class:`~trainer.train.TrainResult`. The children's output goes to this module's log
line by line; a failed launch raises :class:`LaunchError` with the tail of it.

``--multi_gpu`` selects accelerate's torchrun launcher, which starts the N processes. Without
CUDA they join over gloo on the CPU (``train_adapter`` asks for the CPU there); accelerate 1.16's
``--cpu`` launcher starts a single process unless given an MPI host file, so it is not used.

Importing this module loads nothing heavy: ``train_adapter`` (TRL) is imported when called.
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import TrainConfig
from trainer.pairs import Pair

if TYPE_CHECKING:
    from trainer.train import TrainResult

__all__ = ["ARGS_FILE", "RESULT_FILE", "LaunchError", "train_adapter_launched"]

log = logging.getLogger(__name__)

ARGS_FILE = "launch-args.json"
RESULT_FILE = "launch-result.json"
_TAIL_LINES = 120
_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """``accelerate launch`` failed: the message ends with the tail of the processes' output."""


def train_adapter_launched(
    *,
    num_processes: int,
    base_model_dir: Path,
    pairs: Sequence[Pair],
    config: TrainConfig,
    parent_adapter: Path | None = None,
    output_dir: Path,
    progress: bool = True,
    resume: bool = True,
    extra_manifest: dict[str, Any] | None = None,
) -> TrainResult:
    """:func:`trainer.train.train_adapter` in ``num_processes`` data-parallel processes (same
    arguments, same result); ``num_processes <= 1`` calls it here, in this process.

    Raises :class:`LaunchError` when the launch fails (a process raised, was killed, or wrote
    no result), with the last lines of the processes' output.
    """
    arguments: dict[str, Any] = {
        "base_model_dir": base_model_dir,
        "pairs": pairs,
        "config": config,
        "parent_adapter": parent_adapter,
        "output_dir": output_dir,
        "progress": progress,
        "resume": resume,
        "extra_manifest": extra_manifest,
    }
    if num_processes <= 1:
        from trainer.train import train_adapter

        return train_adapter(**arguments)

    _check_batch_split(config, num_processes)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    args_file, result_file = output_dir / ARGS_FILE, output_dir / RESULT_FILE
    result_file.unlink(missing_ok=True)  # a result left by an earlier launch is not this one's
    args_file.write_text(json.dumps(_encode_arguments(arguments), indent=1) + "\n")

    command = [sys.executable, "-m", "accelerate.commands.launch", *_launch_flags(num_processes)]
    command += ["-m", "trainer.launch", str(args_file)]
    log.info("event=train_launch num_processes=%d command=%r", num_processes, command)
    tail = _run(command)
    if not result_file.is_file():
        raise LaunchError(
            f"accelerate launch of {num_processes} processes exited 0 but wrote no "
            f"{result_file}; last output:\n" + "\n".join(tail)
        )
    from trainer.train import TrainResult

    return TrainResult.from_json(json.loads(result_file.read_text()))


# -- the child: `python -m trainer.launch ARGS.json`, once per process ------------------------


def main(argv: Sequence[str] | None = None) -> int:
    # torchrun's failure summary, the end of the output, then names the exception (its root
    # cause) rather than only an exit code.
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_main)(argv)


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m trainer.launch ARGS.json (see trainer.launch)", file=sys.stderr)
        return 2
    _die_with_parent(signal.SIGKILL)  # torchrun starts each process in a session of its own
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,  # one copy of each log line
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    arguments = _decode_arguments(json.loads(Path(argv[0]).read_text()))
    from trainer.train import train_adapter

    result = train_adapter(**arguments)
    if rank == 0:  # the main process: the other processes' results are the same
        result_file = Path(arguments["output_dir"]) / RESULT_FILE
        partial = result_file.with_name(f".{result_file.name}.partial")
        partial.write_text(json.dumps(result.to_json()) + "\n")
        partial.rename(result_file)
    return 0


# -- helpers ----------------------------------------------------------------------------------


def _launch_flags(num_processes: int) -> list[str]:
    """accelerate launch's flags, all given so that no accelerate config file is read."""
    import torch

    flags = [
        "--multi_gpu",  # the torchrun launcher; gloo on the CPU when there is no CUDA
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",  # train_adapter's TrainConfig.bf16 decides
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]
    if not torch.cuda.is_available():  # the cores shared out (OMP_NUM_THREADS of each)
        threads = max(1, (os.cpu_count() or 1) // num_processes)
        flags += ["--num_cpu_threads_per_process", str(threads)]
    return flags


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(command: list[str]) -> list[str]:
    """Runs the launch, logging its output line by line; the last lines, or LaunchError."""
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    prctl = _prctl()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,  # its own process group: stopped with all its workers below
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A killed trainer leaves no launch behind: the launcher gets SIGTERM, on which torchrun
        # stops its processes (each of which also dies with the launcher, see main()).
        preexec_fn=None if prctl is None else lambda: prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM)),
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log.info("event=train_launch_output %s", line)
        code = process.wait()
    except BaseException:  # interrupted (a stopped worker): leave no training process behind
        _stop(process)
        raise
    if code != 0:
        raise LaunchError(
            f"accelerate launch exited with status {code}; last output:\n" + "\n".join(tail)
        )
    return list(tail)


def _prctl() -> Any:
    """libc's prctl, looked up before forking; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(sig: int) -> None:
    """This process gets ``sig`` when its parent dies; exits now if it already has."""
    prctl = _prctl()
    if prctl is None:
        return
    parent = os.getppid()
    prctl(_PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def _stop(process: subprocess.Popen[str]) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def _check_batch_split(config: TrainConfig, num_processes: int) -> None:
    """The check ``train_adapter`` makes in each process, before starting them."""
    if config.gradient_accumulation % num_processes and config.micro_batch_size % num_processes:
        raise ValueError(
            f"batch_size={config.batch_size} with gradient_accumulation="
            f"{config.gradient_accumulation} cannot be split over {num_processes} processes; "
            f"make gradient_accumulation or batch_size / gradient_accumulation a multiple of "
            f"{num_processes}"
        )


def _encode_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    def path(value: Any) -> str | None:  # as given: the processes start in this directory
        return None if value is None else str(value)

    return {
        **arguments,
        "base_model_dir": path(arguments["base_model_dir"]),
        "parent_adapter": path(arguments["parent_adapter"]),
        "output_dir": path(arguments["output_dir"]),
        "pairs": [asdict(pair) for pair in arguments["pairs"]],
        "config": asdict(arguments["config"]),
    }


def _decode_arguments(data: dict[str, Any]) -> dict[str, Any]:
    return {
        **data,
        "base_model_dir": Path(data["base_model_dir"]),
        "parent_adapter": Path(data["parent_adapter"]) if data["parent_adapter"] else None,
        "output_dir": Path(data["output_dir"]),
        "pairs": [Pair(**pair) for pair in data["pairs"]],
        "config": TrainConfig(**data["config"]),
    }


if __name__ == "__main__":
    sys.exit(main())
