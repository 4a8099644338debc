"""Build a tiny, random Qwen2-style code model (and LoRA adapters for it) on the fly.

Integration tests use these to run the real vLLM engine without downloading anything:

* :func:`build_tiny_tokenizer` trains a small byte-level BPE tokenizer on a generated corpus of
  Python-ish code and adds Qwen2.5-Coder's special tokens (ChatML + FIM + repo tokens).
* :func:`build_tiny_model` writes that tokenizer plus a random ``Qwen2ForCausalLM``
  (``config.json``, ``generation_config.json``, ``model.safetensors``) into a directory that both
  ``transformers`` and vLLM load like any Hugging Face checkpoint.
* :func:`build_random_lora` writes a PEFT LoRA adapter with random (non-zero) weights for it.

Everything is deterministic for a given seed and takes a few seconds on a CPU.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
FIM_PAD = "<|fim_pad|>"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
REPO_NAME, FILE_SEP = "<|repo_name|>", "<|file_sep|>"

# In Qwen2.5-Coder's order (there they are ids 151643..151664, here they follow the BPE vocab).
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    FIM_PREFIX,
    FIM_MIDDLE,
    FIM_SUFFIX,
    FIM_PAD,
    REPO_NAME,
    FILE_SEP,
)

BPE_VOCAB_SIZE = 1536
"""Target size of the trained BPE vocabulary (256 byte symbols + merges), before the specials."""

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
"""ChatML, like Qwen2.5-Coder-Instruct's template minus tools and the default system prompt."""

# Qwen2's pre-tokenization regex (splits contractions, letters, single digits, punctuation runs,
# newlines and spaces) so that tokens look like a real code model's.
_QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

MODEL_HIDDEN_SIZE = 128
MODEL_NUM_LAYERS = 2
MODEL_NUM_HEADS = 4
MODEL_NUM_KV_HEADS = 2
MODEL_INTERMEDIATE_SIZE = 256
MODEL_MAX_POSITIONS = 2048
MODEL_INIT_STD = 0.3
"""Std of the random weights; much larger than a trained model's 0.02 so that the output depends
on the context (with 0.02 greedy decoding degenerates into a short cycle of the same tokens)."""

SPECIAL_TOKEN_LOGIT_SCALE = 0.25
"""Factor on the ``lm_head`` rows of the special tokens, so a random model rarely emits them."""

LORA_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

# -- corpus -----------------------------------------------------------------------------------

_NOUNS = (
    "item", "value", "name", "path", "user", "count", "total", "index", "key", "data", "line",
    "word", "node", "text", "score", "price", "size", "result", "buffer", "token", "record",
    "order", "file", "row", "column", "limit", "offset", "message", "config", "request",
    "response", "session", "account", "address", "amount", "balance", "batch", "cache",
    "channel", "client", "comment", "context", "customer", "date", "delay", "device", "entry",
    "event", "field", "filter", "folder", "graph", "group", "header", "height", "image",
    "invoice", "label", "layer", "length", "level", "matrix", "model", "module", "number",
    "owner", "packet", "parent", "payload", "point", "prefix", "product", "queue", "range",
    "report", "schema", "secret", "server", "shape", "signal", "source", "status", "stream",
    "suffix", "table", "target", "task", "timeout", "title", "vector", "weight", "width",
)  # fmt: skip
_VERBS = (
    "get", "set", "load", "save", "parse", "build", "compute", "find", "update", "remove",
    "add", "check", "read", "write", "format", "split", "merge", "sort", "filter", "count",
    "create", "delete", "fetch", "send", "handle", "process", "render", "resolve", "validate",
    "normalize", "encode", "decode", "apply", "collect", "convert", "extract", "flush",
    "group", "insert", "match", "measure", "refresh", "register", "reset", "scan", "select",
    "serialize", "store", "summarize", "transform", "trim", "wrap",
)  # fmt: skip
_ADJECTIVES = (
    "the", "a", "new", "old", "first", "last", "next", "previous", "current", "default",
    "empty", "valid", "invalid", "sorted", "unique", "missing", "given", "total", "largest",
    "smallest", "average", "remaining", "matching", "active", "pending", "cached", "raw",
)  # fmt: skip
_OPS = ("+", "-", "*", "//", "%")
_COMPARE = ("<", ">", "<=", ">=", "==", "!=")
_TYPES = ("int", "str", "float", "bool", "list[int]", "dict[str, int]")


def _snake(rng: random.Random) -> str:
    return f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}"


def _function(rng: random.Random) -> list[str]:
    """One small Python function (3-9 lines) from a handful of templates."""
    name = _snake(rng)
    a, b = rng.sample(_NOUNS, 2)
    doc = f"{rng.choice(_VERBS).capitalize()} {rng.choice(_ADJECTIVES)} {a} and {b}."
    ta, tb = rng.choice(_TYPES[:3]), rng.choice(_TYPES[:3])
    op, cmp = rng.choice(_OPS), rng.choice(_COMPARE)
    n = rng.randint(0, 100)
    kind = rng.randrange(6)
    if kind == 0:
        return [
            f"def {name}({a}: {ta}, {b}: {tb}) -> {ta}:",
            f'    """Return {a} {op} {b}."""',
            f"    return {a} {op} {b}",
        ]
    if kind == 1:
        return [
            f"def {name}({a}s: list[int]) -> int:",
            f'    """{doc}"""',
            "    total = 0",
            f"    for {a} in {a}s:",
            f"        if {a} {cmp} {n}:",
            f"            total += {a}",
            "    return total",
        ]
    if kind == 2:
        return [
            f"def {name}({a}: str) -> str:",
            f"    if not {a}:",
            f'        raise ValueError("empty {a}")',
            f"    {b} = {a}.strip().lower()",
            f'    return f"{{{b}}}-{n}"',
        ]
    if kind == 3:
        cls = "".join(part.capitalize() for part in (a, b))
        return [
            f"class {cls}:",
            f"    def __init__(self, {a}: {ta}, {b}: {tb} = {n}) -> None:",
            f"        self.{a} = {a}",
            f"        self.{b} = {b}",
            "",
            f"    def {name}(self) -> {ta}:",
            f"        return self.{a} {op} self.{b}",
        ]
    if kind == 4:
        return [
            f"def {name}({a}: dict[str, int], {b}: str) -> int | None:",
            f"    # {doc}",
            f"    if {b} in {a}:",
            f"        return {a}[{b}]",
            f"    for key, value in {a}.items():",
            f"        if key.startswith({b}) and value {cmp} {n}:",
            "            return value",
            "    return None",
        ]
    return [
        f"async def {name}(client, {a}: str) -> list[str]:",
        f'    """{doc}"""',
        f'    response = await client.get(f"/api/{{{a}}}", timeout={n})',
        "    response.raise_for_status()",
        f"    {b}s = [line for line in response.text.splitlines() if line]",
        f"    print(len({b}s), {a!r})",
        f"    return sorted({b}s)",
    ]


def _corpus(seed: int = 0, n_functions: int = 150) -> Iterator[str]:
    """A deterministic corpus of a few hundred lines of simple Python, one function per item."""
    rng = random.Random(seed)
    yield "import os\nimport sys\nfrom pathlib import Path\n"
    for _ in range(n_functions):
        yield "\n".join(_function(rng)) + "\n\n"
    # Some prose and symbols so that the vocabulary is not only identifiers.
    yield "# TODO: handle errors; see README.md for details (0-9, a-z, A-Z).\n"
    yield 'if __name__ == "__main__":\n    main(sys.argv[1:])\n'


# -- tokenizer --------------------------------------------------------------------------------


def build_tiny_tokenizer(out_dir: Path) -> Path:
    """Train a byte-level BPE tokenizer and save it as a Hugging Face fast tokenizer in *out_dir*.

    ``AutoTokenizer.from_pretrained(out_dir)`` (and vLLM) load it. Like Qwen's, it NFC-normalises
    and is byte-level, so it round-trips any NFC text (all of ASCII, code, CJK, emoji...; only
    decomposed accents come back composed). The special tokens (ChatML, FIM, ``<|file_sep|>``...)
    are single tokens with the last ids; eos is ``<|im_end|>`` and pad ``<|endoftext|>`` like
    Qwen2.5-Coder-Instruct, there is no bos, and the chat template is ChatML. Returns *out_dir*.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    # transformers >= 5 loads any checkpoint whose config says ``model_type: qwen2`` with its own
    # ``Qwen2Tokenizer``, which rebuilds the pipeline as NFC + this regex + byte-level; use the
    # same here so the tokenizer behaves identically however it is loaded.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Added after training so that they get the last ids, as in Qwen's vocabulary.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (IM_END, ENDOFTEXT)],
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(str(out_dir))
    return out_dir


# -- model ------------------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def build_tiny_model(out_dir: Path, *, seed: int = 0) -> Path:
    """Write the tiny tokenizer and a random bf16 ``Qwen2ForCausalLM`` into *out_dir*.

    The model has 2 layers, hidden size 128, 4 query heads (head_dim 32), 2 KV heads and a vocab
    of the tokenizer's size rounded up to a multiple of 64. Weights are drawn from N(0, 0.3²)
    (norms stay 1, biases 0) with a ``torch.Generator`` seeded by *seed*, so the same seed gives
    byte-identical weights. Returns *out_dir*.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    build_tiny_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    endoftext_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)

    config = Qwen2Config(
        vocab_size=_round_up(len(tokenizer), 64),
        hidden_size=MODEL_HIDDEN_SIZE,
        intermediate_size=MODEL_INTERMEDIATE_SIZE,
        num_hidden_layers=MODEL_NUM_LAYERS,
        num_attention_heads=MODEL_NUM_HEADS,
        num_key_value_heads=MODEL_NUM_KV_HEADS,
        max_position_embeddings=MODEL_MAX_POSITIONS,
        max_window_layers=MODEL_NUM_LAYERS,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        initializer_range=MODEL_INIT_STD,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=endoftext_id,
        eos_token_id=im_end_id,
        pad_token_id=endoftext_id,
        architectures=["Qwen2ForCausalLM"],
        dtype="bfloat16",
    )
    model = Qwen2ForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(
                    torch.randn(param.shape, generator=generator, dtype=torch.float32)
                    * MODEL_INIT_STD
                )
        # Keep greedy output mostly ordinary text: the special tokens (eos included) get small
        # logits, and the padding rows past the tokenizer's vocab get exactly 0, far below the
        # maximum of ~1000 logits of std ~3.4, so they are (practically) never generated.
        n_tokens = len(tokenizer)
        special_ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        model.lm_head.weight[special_ids] *= SPECIAL_TOKEN_LOGIT_SCALE
        model.lm_head.weight[n_tokens:] = 0.0
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(out_dir))
    GenerationConfig(
        bos_token_id=endoftext_id,
        eos_token_id=[im_end_id, endoftext_id],
        pad_token_id=endoftext_id,
        do_sample=False,
    ).save_pretrained(str(out_dir))
    return out_dir


# -- LoRA -------------------------------------------------------------------------------------


def build_random_lora(
    model_dir: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    seed: int = 1,
    scale: float = 0.5,
) -> Path:
    """Write a PEFT LoRA adapter for the model in *model_dir* into *out_dir*.

    It targets all attention and MLP projections with ``r=rank`` and ``lora_alpha=2*rank``. PEFT
    initialises B to zero (a no-op adapter); here A ~ N(0, 1/in_features) and B ~ N(0, scale²)
    are drawn from a generator seeded by *seed*, which with the default scale changes the greedy
    output. Different seeds give different adapters. Returns *out_dir*.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    base = Qwen2ForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, lora_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if ".lora_A." in name:
                std = param.shape[1] ** -0.5
            elif ".lora_B." in name:
                std = scale
            else:
                continue
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std)
    peft_model.save_pretrained(str(out_dir))
    return out_dir
