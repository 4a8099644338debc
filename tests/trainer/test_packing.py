"""Packed DPO batches on the tiny model: per-sequence log-probs equal the padded ones, masks select
exactly the completion tokens, the loss stays finite, and length buckets cut padding."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.utils.tiny_model import build_random_lora, build_tiny_model
from trainer.packing import (
    LengthBucketSampler,
    PackedBatch,
    attention_weight,
    dpo_nll_loss,
    pack_pairs,
    sequence_logps,
    supports_shared_prompts,
    target_counts,
    token_logps,
)

PAD = 0


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The tiny model is no faster on two threads, and one thread does not stall when other
    processes hold the cores (OpenMP's spinning threads then slow each step tenfold)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def examples(model_dir: Path) -> list[dict[str, list[int]]]:
    """Tokenized pairs of varied lengths, as TRL hands them to a collator."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    out = []
    for i in range(7):
        prompt = f"def total_{i}(items):\n" + "    # sum the items\n" * rng.randint(0, 4)
        chosen = "    return sum(items)\n" * rng.randint(1, 3)
        rejected = "    return len(items)\n" * rng.randint(1, 4)
        out.append(
            {
                "prompt_ids": tokenizer(prompt)["input_ids"],
                "chosen_ids": tokenizer(chosen)["input_ids"],
                "rejected_ids": tokenizer(rejected)["input_ids"],
            }
        )
    return out


def _load(model_dir: Path, attn: str, adapter: Path | None = None) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn
    )
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def _padded_logps(
    model: Any, examples: list[dict[str, list[int]]], max_length: int
) -> torch.Tensor:
    """Reference: one right-padded sequence per row with an attention mask, chosen then rejected."""
    sequences = [
        ((ex["prompt_ids"] + ex[side])[:max_length], len(ex["prompt_ids"]))
        for side in ("chosen_ids", "rejected_ids")
        for ex in examples
    ]
    width = max(len(tokens) for tokens, _ in sequences) + 3  # always some padding
    ids = torch.tensor([tokens + [PAD] * (width - len(tokens)) for tokens, _ in sequences])
    mask = torch.tensor(
        [[1] * len(tokens) + [0] * (width - len(tokens)) for tokens, _ in sequences]
    )
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None]).squeeze(-1)
    return torch.stack(
        [
            logps[row, prompt_len - 1 : len(tokens) - 1].sum()
            for row, (tokens, prompt_len) in enumerate(sequences)
        ]
    )


@pytest.mark.parametrize("share_prompt", [False, True], ids=["separate", "shared-prompt"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
def test_packed_log_probs_equal_padded_ones(
    model_dir: Path,
    examples: list[dict[str, list[int]]],
    tmp_path: Path,
    attn: str,
    with_lora: bool,
    share_prompt: bool,
) -> None:
    adapter = build_random_lora(model_dir, tmp_path / "lora") if with_lora else None
    model = _load(model_dir, attn, adapter)
    batch = pack_pairs(
        examples, max_length=48, pad_token_id=PAD, row_length=256, share_prompt=share_prompt
    )
    units = len(examples) if share_prompt else batch.num_sequences
    assert batch.input_ids.shape[0] < units  # several pairs or sequences share a row
    with torch.no_grad():
        packed = sequence_logps(token_logps(model, batch), batch)
    expected = _padded_logps(model, examples, max_length=48)
    torch.testing.assert_close(packed, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("share_prompt", [False, True], ids=["separate", "shared-prompt"])
def test_fused_lm_head_gives_the_same_log_probs(
    model_dir: Path, examples: list[dict[str, list[int]]], share_prompt: bool
) -> None:
    from trl.trainer.utils import add_fused_lm_head

    model = _load(model_dir, "sdpa")
    batch = pack_pairs(
        examples, max_length=64, pad_token_id=PAD, row_length=160, share_prompt=share_prompt
    )
    with torch.no_grad():
        plain = token_logps(model, batch)
        add_fused_lm_head(model)
        fused = token_logps(model, batch, fused_lm_head=True)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-5)


def test_without_position_restarts_sequences_would_see_each_other(
    model_dir: Path, examples: list[dict[str, list[int]]]
) -> None:
    """The restarts are what isolates the sequences (the test above would catch a regression)."""
    model = _load(model_dir, "sdpa")
    batch = pack_pairs(examples, max_length=48, pad_token_id=PAD, row_length=128)
    running = torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids)
    leaky = PackedBatch(
        batch.input_ids, running, batch.target_mask, batch.sequence_index, batch.num_pairs
    )
    with torch.no_grad():
        isolated = sequence_logps(token_logps(model, batch), batch)
        mixed = sequence_logps(token_logps(model, leaky), leaky)
    assert (isolated - mixed).abs().max() > 1e-2


def test_branches_of_a_shared_prompt_do_not_see_each_other(
    model_dir: Path, examples: list[dict[str, list[int]]]
) -> None:
    """The branch mask is what keeps the rejected side from reading the chosen one: with every
    token marked as trunk the log-probs change (the test above would catch a regression)."""
    model = _load(model_dir, "sdpa")
    batch = pack_pairs(examples, max_length=48, pad_token_id=PAD, share_prompt=True)
    assert batch.branch_ids is not None
    leaky = dataclasses.replace(batch, branch_ids=torch.zeros_like(batch.branch_ids))
    with torch.no_grad():
        isolated = sequence_logps(token_logps(model, batch), batch)
        mixed = sequence_logps(token_logps(model, leaky), leaky)
    n = batch.num_pairs
    torch.testing.assert_close(isolated[:n], mixed[:n])  # chosen comes first: it sees no more
    assert (isolated[n:] - mixed[n:]).abs().max() > 1e-2


def test_shared_prompts_score_the_same_tokens_with_fewer_computed(
    examples: list[dict[str, list[int]]],
) -> None:
    separate = pack_pairs(examples, max_length=48, pad_token_id=PAD, row_length=128)
    shared = pack_pairs(
        examples, max_length=48, pad_token_id=PAD, row_length=128, share_prompt=True
    )

    def targets(batch: PackedBatch) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for row, col in batch.target_mask.nonzero().tolist():
            out.setdefault(int(batch.sequence_index[row, col]), []).append(
                int(batch.input_ids[row, col])
            )
        return out

    assert targets(shared) == targets(separate)
    assert target_counts(shared).tolist() == target_counts(separate).tolist()
    prompts = sum(min(len(e["prompt_ids"]), 48) for e in examples)
    # Each pair computes its prompt once, plus the prompt's last token again for the second branch.
    assert shared.num_tokens == separate.num_tokens - prompts + len(examples)
    assert shared.data_tokens == separate.data_tokens == separate.num_tokens


def test_shared_prompt_layout_and_mask() -> None:
    batch = pack_pairs(
        [
            {"prompt_ids": [11, 12, 13], "chosen_ids": [21, 22], "rejected_ids": [31]},
            {"prompt_ids": [], "chosen_ids": [27, 28], "rejected_ids": [35, 36]},  # no prompt
        ],
        max_length=8,
        pad_token_id=PAD,
        row_length=16,
        share_prompt=True,
    )
    assert batch.input_ids.shape[0] == 1
    row = batch.input_ids[0].tolist()
    assert row[:10] == [11, 12, 13, 21, 22, 13, 31, 27, 28, 35] and row[10] == 36
    assert batch.position_ids[0, :11].tolist() == [0, 1, 2, 3, 4, 2, 3, 0, 1, 0, 1]
    assert batch.sequence_index[0, :11].tolist() == [0, 0, 0, 0, 0, 2, 2, 1, 1, 3, 3]
    assert batch.target_mask[0, :11].nonzero().flatten().tolist() == [3, 4, 6, 8, 10]
    mask = batch.attention_mask()[0, 0]
    assert mask[6].nonzero().flatten().tolist() == [0, 1, 5, 6]  # rejected: trunk, its branch
    assert mask[4].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]  # chosen: trunk, its branch
    assert mask[10].nonzero().flatten().tolist() == [9, 10]  # no prompt: its own branch only
    assert bool(mask.any(dim=-1).all())  # every query, padding too, attends somewhere
    additive = batch.attention_mask(torch.float32)[0, 0]
    assert bool((additive[mask] == 0).all()) and bool((additive[~mask] < -1e30).all())


def test_shared_prompts_need_a_mask_taking_attention(
    model_dir: Path, examples: list[dict[str, list[int]]]
) -> None:
    model = _load(model_dir, "sdpa")
    assert supports_shared_prompts(model)
    model.config._attn_implementation = "flash_attention_2"
    assert not supports_shared_prompts(model)
    batch = pack_pairs(examples, max_length=48, pad_token_id=PAD, share_prompt=True)
    with pytest.raises(ValueError, match="share_prompt=False"):
        token_logps(model, batch)


def test_masks_select_exactly_the_completion_tokens() -> None:
    examples = [
        {"prompt_ids": [11, 12, 13], "chosen_ids": [21, 22], "rejected_ids": [31]},
        {"prompt_ids": [14], "chosen_ids": [23, 24, 25, 26], "rejected_ids": [32, 33, 34]},
        {"prompt_ids": [], "chosen_ids": [27, 28], "rejected_ids": [35, 36]},  # no prompt
    ]
    batch = pack_pairs(examples, max_length=4, pad_token_id=PAD, row_length=8)
    assert batch.num_pairs == 3
    targets: dict[int, list[int]] = {}
    for row, col in batch.target_mask.nonzero().tolist():
        targets.setdefault(int(batch.sequence_index[row, col]), []).append(
            int(batch.input_ids[row, col])
        )
    # Sequence i: pair i's chosen side; 3 + i: its rejected side. Cut to 4 tokens, and the first
    # token of a sequence is never scored (nothing of its own sequence precedes it).
    assert targets == {0: [21], 1: [23, 24, 25], 2: [28], 3: [31], 4: [32, 33, 34], 5: [36]}
    assert target_counts(batch).tolist() == [1, 3, 1, 1, 3, 1]
    # Every real token is somewhere exactly once; padding restarts its own positions.
    real = batch.sequence_index >= 0
    assert int(real.sum()) == batch.num_tokens == 4 + 4 + 2 + 4 + 4 + 2
    assert not (batch.target_mask & ~real).any()
    assert bool((batch.input_ids[~real] == PAD).all())
    for row in range(batch.input_ids.shape[0]):
        starts = (batch.position_ids[row] == 0).nonzero().flatten().tolist()
        assert starts[0] == 0
        assert all(
            batch.sequence_index[row, s] != batch.sequence_index[row, s - 1] for s in starts[1:]
        )


def test_non_finite_values_outside_the_targets_do_not_leak() -> None:
    batch = pack_pairs(
        [{"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]}],
        max_length=8,
        pad_token_id=PAD,
        row_length=16,
    )
    logps = torch.full(batch.input_ids.shape, -0.5, requires_grad=True)
    poisoned = torch.where(batch.target_mask, logps, torch.full_like(logps, float("nan")))
    sums = sequence_logps(poisoned, batch)
    assert sums.tolist() == [-1.0, -0.5]
    sums.sum().backward()
    assert logps.grad is not None and bool(torch.isfinite(logps.grad).all())


def test_dpo_nll_loss_matches_its_definition_and_is_finite() -> None:
    policy_c, policy_r = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    ref_c, ref_r = torch.tensor([-11.0, -20.0]), torch.tensor([-11.0, -16.0])
    out = dpo_nll_loss(
        policy_c,
        policy_r,
        ref_c,
        ref_r,
        chosen_tokens=torch.tensor([5, 10]),
        beta=0.1,
        nll_weight=2,
    )
    margins = 0.1 * ((policy_c - ref_c) - (policy_r - ref_r))
    expected_dpo = -torch.nn.functional.logsigmoid(margins).mean()
    torch.testing.assert_close(out.dpo, expected_dpo)
    torch.testing.assert_close(out.nll, torch.tensor(30.0 / 15))
    torch.testing.assert_close(out.loss, expected_dpo + 2 * out.nll)
    torch.testing.assert_close(out.chosen_rewards - out.rejected_rewards, margins)
    # Policy equal to the reference: the DPO term is log 2.
    same = dpo_nll_loss(
        policy_c, policy_r, policy_c, policy_r, chosen_tokens=15, beta=0.1, nll_weight=0
    )
    assert math.isclose(float(same.loss), math.log(2), rel_tol=1e-6)


@pytest.mark.parametrize("share_prompt", [False, True], ids=["separate", "shared-prompt"])
def test_packed_loss_on_the_model_is_finite_and_trains(
    model_dir: Path, examples: list[dict[str, list[int]]], share_prompt: bool
) -> None:
    model = _load(model_dir, "sdpa").train()
    batch = pack_pairs(examples, max_length=64, pad_token_id=PAD, share_prompt=share_prompt)
    policy = sequence_logps(token_logps(model, batch), batch)
    n = batch.num_pairs
    out = dpo_nll_loss(
        policy[:n],
        policy[n:],
        policy[:n].detach(),
        policy[n:].detach(),
        chosen_tokens=target_counts(batch)[:n],
        beta=0.1,
        nll_weight=1.0,
    )
    out.loss.backward()
    assert math.isfinite(out.loss.item())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_shared_and_separate_layouts_give_the_same_gradients(
    model_dir: Path, examples: list[dict[str, list[int]]], tmp_path: Path
) -> None:
    """In float64, so that float32 rounding (which differs between layouts) cannot hide a real
    difference."""
    from peft import PeftModel

    adapter = build_random_lora(model_dir, tmp_path / "lora")

    def loss_and_grads(share_prompt: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model = _load(model_dir, "sdpa", adapter).double()
        assert isinstance(model, PeftModel)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        batch = pack_pairs(examples, max_length=48, pad_token_id=PAD, share_prompt=share_prompt)
        policy = sequence_logps(token_logps(model, batch), batch)
        n = batch.num_pairs
        out = dpo_nll_loss(
            policy[:n],
            policy[n:],
            torch.zeros(n, dtype=torch.float64),
            torch.zeros(n, dtype=torch.float64),
            chosen_tokens=target_counts(batch)[:n],
            beta=0.1,
            nll_weight=1.0,
        )
        out.loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        return out.loss.item(), grads

    shared_loss, shared = loss_and_grads(True)
    separate_loss, separate = loss_and_grads(False)
    assert math.isclose(shared_loss, separate_loss, rel_tol=1e-12)
    assert shared.keys() == separate.keys() and shared
    for key in shared:  # float32 rounding alone gives ~1e-5 of each tensor's largest gradient
        scale = float(separate[key].abs().max())
        assert float((shared[key] - separate[key]).abs().max()) <= 1e-6 * scale, key


def test_packing_needs_fewer_slots_than_padding(examples: list[dict[str, list[int]]]) -> None:
    batch = pack_pairs(examples, max_length=64, pad_token_id=PAD, row_length=128)
    longest = max(
        len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples
    )
    padded_slots = batch.num_sequences * min(longest, 64)
    assert batch.input_ids.numel() < padded_slots
    assert batch.input_ids.shape[1] <= 128


def test_row_length_trades_padding_against_attention() -> None:
    sizes = [50, 40, 30, 30, 20, 10, 10, 5]
    examples = [{"prompt_ids": [1] * n, "chosen_ids": [2], "rejected_ids": [3]} for n in sizes]
    tight = pack_pairs(examples, max_length=200, pad_token_id=PAD, attention_weight=0.0)
    short = pack_pairs(examples, max_length=200, pad_token_id=PAD, attention_weight=1.0)
    longest = max(sizes) + 1
    assert short.input_ids.shape[1] == longest  # never longer rows than a padded batch
    assert tight.input_ids.numel() < short.input_ids.numel() < 2 * len(sizes) * longest
    assert tight.input_ids.shape[1] <= 200
    assert tight.num_tokens == short.num_tokens == 2 * (sum(sizes) + len(sizes))


def test_attention_weight_of_the_tiny_model(model_dir: Path) -> None:
    model = _load(model_dir, "sdpa")
    dense = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert attention_weight(model) == 2 * 2 * 128 / dense
    model.config._attn_implementation = "flash_attention_2"
    assert attention_weight(model) == 0.0


def test_length_buckets_are_permutations_deterministic_and_less_padded() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(10, 500) for _ in range(203)]
    sampler = LengthBucketSampler(lengths, batch_size=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(203))
    assert first == list(LengthBucketSampler(lengths, batch_size=8, seed=3))
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(203)) and second != first

    def padded_slots(order: list[int]) -> int:
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    shuffled = list(range(203))
    random.Random(2).shuffle(shuffled)
    assert padded_slots(first) < 0.8 * padded_slots(shuffled)
    # The one short batch (203 = 25 * 8 + 3) comes last, so the trainer's batches stay aligned.
    assert [len(b) for b in sampler.batches()] == [8] * 25 + [3]
