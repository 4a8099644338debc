"""A PEFT LoRA adapter as a GGUF LoRA file, the form llama.cpp loads beside a model at run time.

The trainer saves adapters the way PEFT does (``adapter_config.json`` plus
``adapter_model.safetensors``), which vLLM serves as they are. llama.cpp wants the same matrices
in a GGUF file of type ``adapter``: for each adapted weight ``W`` (out x in) of the model, a
tensor ``<gguf name of W>.lora_a`` holding A (rank x in) and ``.lora_b`` holding B (out x rank),
with the model's architecture and ``adapter.lora.alpha`` in the metadata. llama.cpp then adds
``scale * alpha / rank * B A x`` to each adapted projection, which is PEFT's LoRA forward pass.

Only what the engine can apply faithfully is converted: plain LoRA (no DoRA, no per-module rank
or alpha) on the attention and MLP projections of a decoder block. Anything else is refused with
:class:`AdapterRejectedError`, so an adapter is never served differently from how it was trained.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from server.engine.lora import WEIGHTS, AdapterRejectedError

# Hugging Face module names of a decoder block -> llama.cpp's tensor names (Llama-family layout,
# which Qwen2 uses).
_BLOCK_MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(?P<layer>\d+)\.(?P<module>[a-z_]+\.[a-z_]+)"
    r"\.lora_(?P<side>[AB])(?:\.default)?\.weight$"
)


def gguf_tensor_name(peft_key: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` ->
    ``blk.3.attn_q.weight.lora_a``; raises AdapterRejectedError for a module llama.cpp's LoRA
    cannot be applied to here (embeddings, the output head, anything outside the blocks)."""
    match = _KEY.match(peft_key)
    if match is None or match["module"] not in _BLOCK_MODULES:
        raise AdapterRejectedError(
            f"The llama.cpp engine cannot serve a LoRA on {peft_key!r}: it serves adapters on "
            f"the decoder blocks' projections ({', '.join(sorted(_BLOCK_MODULES))}). Train "
            "with those target modules, or serve with KAIZEN_ENGINE=vllm."
        )
    side = match["side"].lower()
    return f"blk.{match['layer']}.{_BLOCK_MODULES[match['module']]}.weight.lora_{side}"


def effective_alpha(config: dict[str, object]) -> float:
    """The alpha llama.cpp needs for PEFT's scaling: llama.cpp scales by alpha / rank, PEFT by
    lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    rank = int(config["r"])  # type: ignore[call-overload]
    alpha = float(config.get("lora_alpha", rank))  # type: ignore[arg-type]
    if config.get("use_rslora"):
        return alpha * math.sqrt(rank)
    return alpha


def _check_config(config: dict[str, object], path: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterRejectedError(f"{path} is a {config.get('peft_type')} adapter, not LoRA.")
    if config.get("use_dora"):
        raise AdapterRejectedError(f"{path} is a DoRA adapter; the llama.cpp engine serves LoRA.")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterRejectedError(
                f"{path} sets {key}: per-module ranks or alphas are not supported by the "
                "llama.cpp engine (one alpha per adapter). Serve it with KAIZEN_ENGINE=vllm."
            )


def convert_peft_lora(adapter_dir: Path, out_path: Path, *, architecture: str) -> Path:
    """Write the PEFT adapter in ``adapter_dir`` as a GGUF LoRA for a model of ``architecture``
    (the model GGUF's ``general.architecture``, e.g. ``qwen2``) at ``out_path``.

    Raises:
        AdapterRejectedError: the adapter is not one the engine can serve (see the module doc).
    """
    import gguf
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    _check_config(config, adapter_dir)
    # Through torch: numpy has no bfloat16, in which adapters may be saved.
    tensors = {k: v.float().numpy() for k, v in load_file(str(adapter_dir / WEIGHTS)).items()}
    named: dict[str, np.ndarray] = {}
    for key, value in sorted(tensors.items()):
        named[gguf_tensor_name(key)] = np.ascontiguousarray(value, dtype=np.float32)
    if not named:
        raise AdapterRejectedError(f"{adapter_dir / WEIGHTS} holds no LoRA tensors.")
    sides = {"a": set(), "b": set()}  # type: dict[str, set[str]]
    for name in named:
        base, _, side = name.rpartition(".lora_")
        sides[side].add(base)
    unpaired = sorted(sides["a"] ^ sides["b"])
    if unpaired:
        raise AdapterRejectedError(f"{adapter_dir}: LoRA A/B tensors without a partner: {unpaired}")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, effective_alpha(config))
    for name, value in named.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def model_architecture(gguf_path: Path) -> str:
    """``general.architecture`` of a model GGUF (read from its header; the file is mmapped)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if field is None:
        raise AdapterRejectedError(f"{gguf_path} has no {gguf.Keys.General.ARCHITECTURE}.")
    return bytes(field.parts[field.data[0]]).decode()
