"""A pair's weight (trainer.pairs.Pair.weight: judge pairs below execution pairs) reaches the
DPO+NLL loss: through TRL's column pruning and the packed collator, and in the loss itself."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import trainer.train as train_module
from tests.trainer.test_train import PAIRS, _config, _train
from trainer.packing import PackedPreferenceCollator, dpo_nll_loss

POLICY_C, POLICY_R = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
REF_C, REF_R = torch.tensor([-11.0, -20.0]), torch.tensor([-11.0, -16.0])


def _loss(weights: torch.Tensor | None) -> Any:
    return dpo_nll_loss(
        POLICY_C,
        POLICY_R,
        REF_C,
        REF_R,
        chosen_tokens=torch.tensor([5, 10]),
        beta=0.1,
        nll_weight=1.0,
        weights=weights,
    )


def test_weights_scale_each_pairs_terms() -> None:
    plain, ones = _loss(None), _loss(torch.ones(2))
    torch.testing.assert_close(plain.loss, ones.loss)
    half = _loss(torch.tensor([1.0, 0.5]))
    margins = 0.1 * ((POLICY_C - REF_C) - (POLICY_R - REF_R))
    per_pair = -torch.nn.functional.logsigmoid(margins)
    torch.testing.assert_close(half.dpo, (per_pair[0] + 0.5 * per_pair[1]) / 2)
    torch.testing.assert_close(half.nll, torch.tensor((10.0 + 0.5 * 20.0) / 15))
    # A pair of weight 0 gets no gradient at all.
    policy = POLICY_C.clone().requires_grad_(True)
    dpo_nll_loss(
        policy,
        POLICY_R,
        REF_C,
        REF_R,
        chosen_tokens=15,
        beta=0.1,
        nll_weight=1.0,
        weights=torch.tensor([1.0, 0.0]),
    ).loss.backward()
    assert policy.grad is not None and policy.grad[1] == 0 and policy.grad[0] != 0


def test_the_packed_collator_hands_the_weights_on_in_pair_order() -> None:
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5], "weight": 1.0},
        {"prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [9], "weight": 0.5},
    ]
    inputs = PackedPreferenceCollator(pad_token_id=0, max_length=16)(examples)
    assert inputs["pair_weights"].tolist() == [1.0, 0.5]
    unweighted = [{k: v for k, v in e.items() if k != "weight"} for e in examples]
    assert "pair_weights" not in PackedPreferenceCollator(pad_token_id=0, max_length=16)(unweighted)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.utils.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("weights") / "model")


def test_training_gives_each_pair_its_weight(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[float]] = []
    real = train_module.dpo_nll_loss

    def spy(*args: Any, **kwargs: Any) -> Any:
        weights = kwargs.get("weights")
        seen.append([] if weights is None else sorted(weights.tolist()))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "dpo_nll_loss", spy)
    pairs = [replace(p, weight=0.5, source="judge") if i % 2 else p for i, p in enumerate(PAIRS)]
    result = _train(model_dir, tmp_path / "out", pairs=pairs, config=_config(max_steps=2))
    assert result.adapter_dir is not None, result.stopped_reason
    assert seen and all(w and set(w) <= {0.5, 1.0} for w in seen)
    assert {0.5, 1.0} <= {x for w in seen for x in w}


def test_padded_batches_refuse_weighted_pairs(model_dir: Path, tmp_path: Path) -> None:
    pairs = [replace(PAIRS[0], weight=0.5), *PAIRS[1:]]
    with pytest.raises(ValueError, match="need packed batches"):
        _train(model_dir, tmp_path / "out", pairs=pairs, config=_config(packing=False))
