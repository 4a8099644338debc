"""Adapter directories and registry rows for tests of rollout (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from sqlalchemy.orm import Session, sessionmaker

from server.store import registry
from server.store.models import Adapter

BASE_SHA = "b" * 64


def make_adapter_dir(path: Path, *, rank: int = 8, base_sha256: str = BASE_SHA) -> Path:
    """A PEFT-shaped adapter directory: config, (tiny) safetensors weights, manifest."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank}))
    save_file({"lora_A": torch.zeros(rank, 4)}, str(path / "adapter_model.safetensors"))
    (path / "manifest.json").write_text(json.dumps({"base_model": {"sha256": base_sha256}}))
    return path


def approved_adapter(
    factory: sessionmaker[Session], root: Path, name: str, **kwargs: object
) -> Adapter:
    """A registered adapter moved through the gate to ``approved``."""
    path = make_adapter_dir(root / name, **kwargs)  # type: ignore[arg-type]
    with factory() as session:
        adapter = registry.register_adapter(
            session=session,
            name=name,
            path=str(path),
            base_sha256=BASE_SHA,
            manifest={},
            parent_id=None,
            round_id=None,
            actor="test",
        )
        for state in ("evaluating", "approved"):
            registry.transition(session=session, adapter=adapter, to_state=state, actor="test")
        return adapter
