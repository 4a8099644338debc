"""Batch generation with vLLM for the trainer (resampling, evaluation), in-process and offline.

A request reads to the model exactly as it would through Kaizen's server: the same
fill-in-the-middle prompt, stop strings and stop tokens (:func:`prepare_request` builds them with
the server's own :mod:`server.engine.fim`), so what the trainer samples and scores is what users
are served.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from server.config import Settings
from server.engine.fim import FIM_END_TOKENS, FimFormat, suffix_stops
from server.engine.lora import read_adapter_rank
from server.engine.vllm_engine import apply_cpu_binding, install_process_guard, scheduler_args

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm.lora.request import LoRARequest

__all__ = [
    "GeneratedChoice",
    "GenerationRequest",
    "Generator",
    "GeneratorFactory",
    "HfTokens",
    "PreparedRequest",
    "Tokens",
    "VllmGenerator",
    "prepare_request",
    "vllm_generator_factory",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str  # text before the cursor, or the whole plain prompt
    suffix: str | None = None  # text after the cursor (fill-in-the-middle); None: plain
    single_line: bool = False  # stop at the end of the line (as the server's `single_line`)
    # The served request's stop strings (recorded ones already hold the suffix's and the
    # single-line stop; duplicates are dropped) and its max_tokens (None: the call's).
    stop: tuple[str, ...] = ()
    max_tokens: int | None = None
    # What the model saw before ``<|fim_prefix|>`` (repository-level files: the record's
    # ``params.fim_context``); "" for a file-level prompt.
    context: str = ""


@dataclass(frozen=True)
class GeneratedChoice:
    text: str
    finish_reason: str | None  # "stop" (a stop string or token, or the end) | "length"


class Generator(Protocol):
    """What a round and the gate need of an inference engine (:class:`VllmGenerator`; tests use
    scripted ones). ``close`` frees the engine's memory."""

    def generate(self, requests: Sequence[GenerationRequest], **kwargs: Any) -> list[list[str]]: ...

    def close(self) -> None: ...


GeneratorFactory = Callable[[], Generator]  # a fresh engine per call; the caller closes it


@dataclass(frozen=True)
class PreparedRequest:
    """What goes to the engine for one request."""

    prompt_token_ids: list[int]
    stop: list[str]
    stop_token_ids: list[int]


class Tokens(Protocol):
    """The two tokenizer operations a request needs (a subset of the server's ``Engine``)."""

    def tokenize(self, text: str) -> list[int]: ...

    def special_token_id(self, token: str) -> int | None: ...


class HfTokens:
    """:class:`Tokens` over a Hugging Face tokenizer, as the server's ``VllmEngine`` does it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def special_token_id(self, token: str) -> int | None:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            return None
        return int(token_id)


def prepare_request(
    request: GenerationRequest, tokens: Tokens, fim: FimFormat | None = None
) -> PreparedRequest:
    """Prompt token ids and stops for ``request``, as ``CompletionService.prepare_completion``
    builds them for a completion request with the same prompt, suffix and ``single_line``.

    An empty suffix counts as none (as in the server). Raises ValueError for an empty request
    and for a suffix when the model has no fill-in-the-middle tokens.
    """
    fim = fim or FimFormat()
    suffix = request.suffix or None
    if not request.prompt and not suffix:
        raise ValueError("The request is empty: give a prompt (and a suffix for infilling).")
    stop: list[str] = []
    if suffix is not None:
        if any(tokens.special_token_id(t) is None for t in fim.tokens()):
            raise ValueError("The model has no fill-in-the-middle tokens; a suffix cannot be used.")
        text = fim.build(request.prompt, suffix, request.context)
        stop += suffix_stops(suffix)
    else:
        text = request.prompt
    if request.single_line:
        stop.append("\n")
    stop += [s for s in request.stop if s]
    ids = (tokens.special_token_id(t) for t in FIM_END_TOKENS)
    return PreparedRequest(
        prompt_token_ids=tokens.tokenize(text),
        stop=list(dict.fromkeys(stop)),  # in order, each once
        stop_token_ids=[i for i in ids if i is not None],
    )


class VllmGenerator:
    """An offline ``vllm.LLM`` with LoRA enabled, generating for batches of requests.

    vLLM starts its engine core in a child process (``spawn``): a script that builds one needs an
    ``if __name__ == "__main__":`` guard. Adapter directories must not change once used: vLLM
    caches an adapter by its id and may re-read the directory after evicting it.

    >>> with VllmGenerator("model") as gen:  # doctest: +SKIP
    ...     texts = gen.generate([GenerationRequest("def add(a, b):\\n    ", "\\n")], n=4)
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_model_len: int = 2048,
        max_lora_rank: int = 16,
        max_loras: int = 2,
        kv_cache_gib: float = 2.0,
        dtype: str = "bfloat16",
        enforce_eager: bool = False,
        seed: int = 0,
        cpu_cores: str | None = None,
        cpu_shared: bool | None = None,
    ) -> None:
        """``cpu_cores``/``cpu_shared``: the CPU cores vLLM binds to on a CPU host (default:
        ``KAIZEN_TRAINER_CPU_CORES`` and ``KAIZEN_CPU_SHARED_WITH_TRAINER``)."""
        from transformers import AutoTokenizer
        from vllm import LLM

        from server.config import get_settings

        if kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be positive: {kv_cache_gib}")
        self.model_dir = Path(model_dir).expanduser()
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.tokens = HfTokens(AutoTokenizer.from_pretrained(str(self.model_dir)))
        self._adapters: dict[Path, LoRARequest] = {}
        self._ids = itertools.count(1)  # adapter ids (and names) are never reused
        log.info("event=generator_starting dir=%s", self.model_dir)
        # The engine core dies with this process (a killed worker leaves no GBs behind), and on
        # a CPU host it keeps off the server's cores.
        install_process_guard()
        if cpu_cores is None or cpu_shared is None:
            settings = get_settings()
            cpu_cores = settings.trainer_cpu_cores if cpu_cores is None else cpu_cores
            cpu_shared = settings.cpu_shared_with_trainer if cpu_shared is None else cpu_shared
        apply_cpu_binding(cpu_cores, role="trainer", shared=cpu_shared)
        # An explicit KV cache size: on the CPU it also skips the worker's warm-up pass, on a GPU
        # it keeps vLLM from taking most of the memory the training step beside it needs.
        self._llm: LLM | None = LLM(
            model=str(self.model_dir),
            dtype=dtype,  # type: ignore[arg-type]
            max_model_len=max_model_len,
            enable_lora=True,
            max_lora_rank=max_lora_rank,
            max_loras=max_loras,
            kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
            enforce_eager=enforce_eager,
            seed=seed,
            disable_log_stats=True,
            **scheduler_args(max_model_len),
        )

    # ---------------------------------------------------------------- life cycle

    def close(self) -> None:
        """Stop the engine core and free its memory (idempotent)."""
        if self._llm is None:
            return
        import gc

        llm, self._llm = self._llm, None
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()
        log.info("event=generator_closed dir=%s", self.model_dir)

    def __enter__(self) -> VllmGenerator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- adapters

    def _lora(self, adapter: str | Path | None) -> LoRARequest | None:
        from vllm.lora.request import LoRARequest

        if adapter is None:
            return None
        path = Path(adapter).expanduser().resolve()
        if path in self._adapters:
            return self._adapters[path]
        rank = read_adapter_rank(path)  # ValueError when it is not a PEFT adapter
        if rank > self.max_lora_rank:
            raise ValueError(
                f"Adapter {path} has rank {rank}; this generator accepts at most "
                f"{self.max_lora_rank} (max_lora_rank)."
            )
        lora_id = next(self._ids)
        request = LoRARequest(
            lora_name=f"trainer-{lora_id}", lora_int_id=lora_id, lora_path=str(path)
        )
        self._adapters[path] = request
        log.info("event=adapter_registered id=%d rank=%d path=%s", lora_id, rank, path)
        return request

    # ---------------------------------------------------------------- generation

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        adapter: str | Path | None = None,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: int | None = 0,
        progress: bool = False,
    ) -> list[list[str]]:
        """``n`` completions of each request, in order (one list per request); see
        :meth:`generate_choices`, which also says how each one ended."""
        rows = self.generate_choices(
            requests,
            adapter=adapter,
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed,
            progress=progress,
        )
        return [[choice.text for choice in row] for row in rows]

    def generate_choices(
        self,
        requests: Sequence[GenerationRequest],
        *,
        adapter: str | Path | None = None,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: int | None = 0,
        progress: bool = False,
    ) -> list[list[GeneratedChoice]]:
        """``n`` completions of each request with their finish reasons, in order.

        ``max_tokens`` applies where a request sets none. A prompt too long for
        ``max_model_len`` gets ``max_tokens`` cut to what fits; one that leaves no room at all
        gets ``n`` empty texts ending in ``"length"`` (and a warning in the log). ``seed`` seeds
        every request alike, so a request's samples do not depend on the rest of the batch.
        Raises ValueError, before anything runs, for an empty request, a suffix the model
        cannot infill, or an unusable adapter (no ``adapter_config.json``, rank too high).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self._llm is None:
            raise RuntimeError("The generator is closed.")
        if n < 1 or max_tokens < 1:
            raise ValueError(
                f"n and max_tokens must be at least 1 (n={n}, max_tokens={max_tokens})"
            )
        lora = self._lora(adapter)
        # A prompt with no room gives empty texts that ran out of tokens: never answers.
        results = [[GeneratedChoice("", "length")] * n for _ in requests]
        prompts: list[TokensPrompt] = []
        params: list[SamplingParams] = []
        slots: list[int] = []
        for i, request in enumerate(requests):
            prepared = prepare_request(request, self.tokens)
            room = self.max_model_len - len(prepared.prompt_token_ids)
            if room < 1:
                log.warning(
                    "event=prompt_too_long index=%d prompt_tokens=%d max_model_len=%d",
                    i,
                    len(prepared.prompt_token_ids),
                    self.max_model_len,
                )
                continue
            prompts.append(TokensPrompt(prompt_token_ids=prepared.prompt_token_ids))
            params.append(
                SamplingParams(
                    n=n,
                    temperature=temperature,
                    top_p=top_p,
                    max_tokens=min(request.max_tokens or max_tokens, room),
                    stop=prepared.stop or None,
                    stop_token_ids=prepared.stop_token_ids or None,
                    seed=seed,
                )
            )
            slots.append(i)
        if not prompts:
            return results
        outputs = self._llm.generate(prompts, params, use_tqdm=progress, lora_request=lora)
        for slot, output in zip(slots, outputs, strict=True):
            row = [GeneratedChoice("", None)] * n
            for choice in output.outputs:
                row[choice.index] = GeneratedChoice(choice.text, choice.finish_reason)
            results[slot] = row
        return results


def vllm_generator_factory(settings: Settings, model_dir: Path) -> Callable[[], VllmGenerator]:
    """Builds the trainer's vLLM engine with the server's limits (context, LoRA rank, KV cache),
    for resampling and the gate; each call starts a fresh one (close it when done)."""

    def make() -> VllmGenerator:
        return VllmGenerator(
            model_dir,
            max_model_len=settings.max_model_len,
            max_lora_rank=settings.max_lora_rank,
            kv_cache_gib=settings.kv_cache_gib,
            dtype=settings.dtype,
            enforce_eager=settings.enforce_eager,
            seed=settings.seed,
        )

    return make
