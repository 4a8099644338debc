"""The production engine: vLLM's ``AsyncLLM`` in the server process, LoRA enabled from the start.

vLLM runs its engine core (scheduler and model) in a child process of its own; this object is the
front end the API talks to. Adapters get a fresh, never-reused integer id each time they are
loaded, because vLLM caches adapter weights (and prefix-cache entries) by id and name.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.config import Settings
from server.engine.base import (
    AdapterInfo,
    ChoiceDelta,
    EngineError,
    EngineNotReadyError,
    GenerationParams,
    UnknownAdapterError,
)
from server.engine.cpu import choose_cores, usable_cores
from server.engine.hf_tokens import HfTokenMethods
from server.engine.lora import (
    AdapterRejectedError,
    base_fingerprint,
    check_adapter,
)
from server.engine.model import resolve_model_dir, served_name

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)


# -- engine processes die with their parent ------------------------------------------------------
#
# vLLM runs its engine core (and, on some platforms, workers) in child processes started through
# ``multiprocessing``. A server killed with SIGKILL runs no clean-up, and those children (GBs
# each) lived on. The process classes below make every such child watch its parent: the
# parent's end of a pipe closes when the parent dies, however it dies, and the child then kills
# its own children and itself. The pipe (``multiprocessing.parent_process().sentinel``) is per
# process, unlike PR_SET_PDEATHSIG, which fires when the *thread* that started the child ends
# (the server starts vLLM from a worker thread).


def _die_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        with contextlib.suppress(Exception):  # the log may be gone with the parent
            print(
                f"event=parent_exited pid={os.getpid()} parent={parent.pid} (exiting with it)",
                file=sys.stderr,
                flush=True,
            )
        with contextlib.suppress(Exception):
            import psutil

            for child in psutil.Process().children(recursive=True):
                child.kill()
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="kaizen-parent-watch", daemon=True).start()


class _DiesWithParent:
    def run(self) -> None:
        _die_with_parent()
        install_process_guard()  # the child's own children watch it in turn
        super().run()  # type: ignore[misc]


class _SpawnProcess(_DiesWithParent, multiprocessing.context.SpawnProcess):
    pass


class _ForkProcess(_DiesWithParent, multiprocessing.context.ForkProcess):
    pass


def install_process_guard() -> None:
    """Make every process started from now on through a spawn or fork context (as vLLM starts
    its engine core) exit when this process dies. Idempotent; call before starting vLLM."""
    multiprocessing.context.SpawnContext.Process = _SpawnProcess  # type: ignore[assignment]
    multiprocessing.context.ForkContext.Process = _ForkProcess  # type: ignore[assignment]


# -- CPU cores ------------------------------------------------------------------------------------


def apply_cpu_binding(spec: str, *, role: str, shared: bool) -> str | None:
    """Set ``VLLM_CPU_OMP_THREADS_BIND`` for the engine about to start (its child processes
    read the environment), unless the operator set it; returns what the engine will use.
    vLLM's own ``auto`` keeps a core per engine for its scheduler, which on a small host left
    every engine on core 0, all of them fighting over it."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    global _bind_we_set
    operator = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    # A value a Kaizen process up the tree chose (and its children inherited) is not the
    # operator's: this engine chooses its own cores.
    inherited = os.environ.get(_INHERITED_BIND_ENV)
    if operator is not None and operator not in (_bind_we_set, inherited):
        log.info(
            "event=cpu_binding role=%s cores=%s source=VLLM_CPU_OMP_THREADS_BIND", role, operator
        )
        return operator
    cores = choose_cores(spec, role=role, shared=shared, available=usable_cores())
    bind = ",".join(str(c) for c in cores)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = os.environ[_INHERITED_BIND_ENV] = _bind_we_set = bind
    log.info("event=cpu_binding role=%s cores=%s shared=%s", role, bind, shared)
    return bind


_bind_we_set: str | None = None  # what apply_cpu_binding put in the environment, if anything
# Marks VLLM_CPU_OMP_THREADS_BIND as Kaizen's choice for the processes it starts (the tests start
# servers from a process that ran engines; a deployment may start the trainer from the server's
# host shell), so a child Kaizen process does not take it for the operator's setting.
_INHERITED_BIND_ENV = "KAIZEN_INHERITED_CPU_BIND"


def scheduler_args(max_model_len: int) -> dict[str, Any]:
    """Scheduler settings every Kaizen vLLM engine uses (server and trainer).

    On the CPU, prompts are prefilled whole: vllm-cpu 0.32 rewinds the random generator of a
    seeded request whose prompt was prefilled in chunks, which the CPU generator cannot do
    ("CPU Generator does not use offset"), and the engine dies, so one client sending ``seed``
    with a long prompt among others would take the server down.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 2048)}


class VllmEngine(HfTokenMethods):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_name = served_name(settings)
        self.max_model_len = settings.max_model_len
        self.model_dir: Path | None = None
        self.base_sha256: str | None = None  # the served checkpoint's fingerprint
        self._llm: AsyncLLM | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._adapters: dict[str, tuple[LoRARequest, AdapterInfo]] = {}
        self._ids = itertools.count(1)  # adapter ids are never reused
        self._ready = False

    @classmethod
    def from_settings(cls, settings: Settings) -> VllmEngine:
        return cls(settings)

    # ---------------------------------------------------------------- life cycle

    def _engine_args(self, model_dir: Path) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform

        s = self.settings
        kv_cache_bytes = None
        if current_platform.is_cpu():
            # An explicit size (rather than the legacy whole-GiB VLLM_CPU_KVCACHE_SPACE, which
            # wins when set) also lets the CPU worker skip its warm-up pass.
            kv_cache_bytes = int(s.kv_cache_gib * 2**30)
        return AsyncEngineArgs(
            model=str(model_dir),
            served_model_name=[self.model_name],
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            enable_lora=True,
            max_loras=s.max_loras,
            max_lora_rank=s.max_lora_rank,
            max_cpu_loras=max(s.max_cpu_loras, s.max_loras),
            enforce_eager=s.enforce_eager,
            gpu_memory_utilization=s.gpu_memory_utilization,
            tensor_parallel_size=s.tensor_parallel_size,
            kv_cache_memory_bytes=kv_cache_bytes,
            disable_log_stats=True,
            seed=s.seed,
            **scheduler_args(s.max_model_len),
        )

    def _stat_loggers(self) -> list[Any] | None:
        """vLLM's Prometheus logger alone (its metrics go to prometheus_client's global
        registry, which GET /metrics shows), without the periodic throughput lines it would
        also log with ``disable_log_stats=False``."""
        if not self.settings.engine_metrics:
            return None
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        return [PrometheusStatLogger]

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_dir = await asyncio.to_thread(resolve_model_dir, self.settings)
        log.info("event=engine_starting model=%s dir=%s", self.model_name, self.model_dir)
        fingerprint = await asyncio.to_thread(base_fingerprint, self.model_dir)
        self.base_sha256 = fingerprint["sha256"]
        self._tokenizer = await asyncio.to_thread(
            AutoTokenizer.from_pretrained, str(self.model_dir)
        )
        args = self._engine_args(self.model_dir)
        install_process_guard()
        apply_cpu_binding(
            self.settings.cpu_cores, role="server", shared=self.settings.cpu_shared_with_trainer
        )
        self._llm = await asyncio.to_thread(
            AsyncLLM.from_engine_args, args, stat_loggers=self._stat_loggers()
        )
        for name, path in self.settings.adapters.items():
            await self.add_adapter(name, path)
        self._ready = True

    def is_ready(self) -> bool:
        return self._ready and self._llm is not None and not self._llm.errored

    async def shutdown(self) -> None:
        self._ready = False
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)
            # AsyncLLM.__del__ calls shutdown again; at interpreter exit that fails noisily.
            del llm
            gc.collect()

    # ---------------------------------------------------------------- adapters

    def adapters(self) -> list[AdapterInfo]:
        return [info for _, info in self._adapters.values()]

    async def add_adapter(self, name: str, path: Path | str) -> AdapterInfo:
        """Load a LoRA adapter under ``name``; refuses a name already in use."""
        from vllm.lora.request import LoRARequest

        if self._llm is None:
            raise EngineNotReadyError("The engine is not running.")
        if name in self._adapters or name == self.model_name:
            raise AdapterRejectedError(
                f"The name {name!r} is taken; every adapter version needs a new name."
            )
        path = Path(path).expanduser().resolve()
        rank = check_adapter(
            path, max_rank=self.settings.max_lora_rank, base_sha256=self.base_sha256
        )
        request = LoRARequest(lora_name=name, lora_int_id=next(self._ids), lora_path=str(path))
        try:
            await self._llm.add_lora(request)
        except Exception as exc:
            raise AdapterRejectedError(f"vLLM refused adapter {name!r} at {path}: {exc}") from exc
        info = AdapterInfo(
            name=name, path=str(path), meta={"rank": rank, "id": request.lora_int_id}
        )
        self._adapters[name] = (request, info)
        log.info(
            "event=adapter_loaded name=%s id=%d rank=%d path=%s",
            name,
            request.lora_int_id,
            rank,
            path,
        )
        return info

    async def remove_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise UnknownAdapterError(f"No adapter named {name!r} is loaded.")
        request, _ = self._adapters.pop(name)
        if self._llm is not None:
            await self._llm.remove_lora(request.lora_int_id)
        log.info("event=adapter_removed name=%s id=%d", name, request.lora_int_id)

    # ---------------------------------------------------------------- generation

    async def generate(
        self,
        *,
        request_id: str,
        prompt_token_ids: list[int],
        params: GenerationParams,
        adapter: str | None,
    ) -> AsyncIterator[list[ChoiceDelta]]:
        from vllm import SamplingParams
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._llm is None:
            raise EngineNotReadyError("The model is still loading.")
        lora = None
        if adapter is not None:
            if adapter not in self._adapters:
                raise UnknownAdapterError(f"No adapter named {adapter!r} is loaded.")
            lora = self._adapters[adapter][0]
        # tokens_input: the service has tokenised the prompt and checked its length already.
        sampling = SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            seed=params.seed,
            output_kind=RequestOutputKind.DELTA,
        )
        try:
            async for output in self._llm.generate(
                tokens_input(prompt_token_ids), sampling, request_id, lora_request=lora
            ):
                yield [
                    ChoiceDelta(
                        index=o.index,
                        text=o.text,
                        token_count=len(o.token_ids),
                        finish_reason=o.finish_reason,
                        stop_reason=o.stop_reason,
                    )
                    for o in output.outputs
                ]
        except EngineDeadError as exc:
            raise EngineError("The vLLM engine died; restart the server.") from exc
