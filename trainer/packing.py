"""Batches of preference pairs with little or no padding (CodeACT's dynamic packing), and the
DPO + NLL loss on packed batches.

* :class:`LengthBucketSampler` orders pairs so that each batch holds pairs of similar length
  (less padding for TRL's padded batches, fuller rows for packed ones).
* :func:`pack_pairs` concatenates the ``prompt+chosen`` and ``prompt+rejected`` sequences of a
  batch into a few rows (first-fit decreasing, the row length picked by a cost estimate).
  ``position_ids`` restart at 0 for every sequence and the rows go to the model with
  ``attention_mask=None``: transformers (5.19, ``masking_utils.find_packed_sequence_indices``)
  then reads each restart as a sequence boundary and builds a block-diagonal causal mask for
  sdpa and eager, and flash-attention uses its varlen kernels. The padding at the end of a row
  is a sequence of its own (positions 0, 1, ...), so no query row is fully masked (sdpa returns
  NaN for those). The tests check packed log-probs against padded ones.
* :func:`token_logps` and :func:`sequence_logps` give each sequence's summed completion log-prob;
  :func:`dpo_nll_loss` is TRL's ``loss_type=["sigmoid", "sft"]`` on them.

Masks select with ``torch.where``, never by multiplying with 0: a non-finite value at a masked
position times 0 is still NaN (the pilot's likely NaN).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler


class LengthBucketSampler(Sampler[int]):
    """Indices in batches of similar length, reshuffled every epoch, deterministic in (seed, epoch).

    The pairs are shuffled, cut into windows of ``window_batches`` batches, sorted by length inside
    each window and cut into batches; the full batches are shuffled and any short one goes last (so
    the trainer's batching stays aligned). ``set_epoch`` (called by ``Trainer``) picks the order, so
    a run resumed from a checkpoint sees the same batches as an uninterrupted one.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, window_batches: int = 16
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.window = batch_size * window_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        """This epoch's batches of indices, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start : start + self.window], key=self.lengths.__getitem__)
            batches += [
                window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)
            ]
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        return [full[i] for i in torch.randperm(len(full), generator=generator).tolist()] + short

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.batches() for i in batch])


@dataclass(frozen=True)
class PackedBatch:
    """Sequences packed into rows. Sequence ``i`` is pair ``i``'s chosen side, ``num_pairs + i`` its
    rejected side (TRL's [chosen; rejected] layout).

    ``target_mask`` marks the tokens that are scored: completion tokens, never the first token of
    a sequence (it has no prefix in its own sequence). ``sequence_index`` is the sequence of each
    token, -1 for padding.
    """

    input_ids: torch.Tensor  # [rows, length] long
    position_ids: torch.Tensor  # [rows, length] long
    target_mask: torch.Tensor  # [rows, length] bool
    sequence_index: torch.Tensor  # [rows, length] long
    num_pairs: int

    @property
    def num_sequences(self) -> int:
        return 2 * self.num_pairs

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int((self.sequence_index >= 0).sum())

    def as_inputs(self) -> dict[str, Any]:
        """The batch as a trainer's inputs dict (what a collator returns)."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "target_mask": self.target_mask,
            "sequence_index": self.sequence_index,
            "num_pairs": torch.tensor(self.num_pairs),
        }

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, Any]) -> PackedBatch:
        return cls(
            input_ids=inputs["input_ids"],
            position_ids=inputs["position_ids"],
            target_mask=inputs["target_mask"],
            sequence_index=inputs["sequence_index"],
            num_pairs=int(inputs["num_pairs"]),
        )


def pack_pairs(
    examples: Sequence[Mapping[str, Sequence[int]]],
    *,
    max_length: int,
    pad_token_id: int,
    row_length: int | None = None,
    attention_weight: float = 0.0,
) -> PackedBatch:
    """Pack tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, as TRL makes them).

    Each ``prompt+completion`` is cut to ``max_length`` tokens (keeping the start, like TRL), then
    placed first-fit-decreasing into rows of at most ``row_length`` tokens (default
    ``max_length``), padded to the fullest row. Of the row lengths between the longest sequence
    and that bound, the one of least estimated cost ``rows * length * (1 + attention_weight *
    length)`` is used: dense layers cost per token slot, sdpa's attention per query-key pair of
    a row whatever the mask (see :func:`attention_weight`). With 0 (varlen flash-attention
    wastes nothing on long rows) that is the fewest padded slots.
    """
    if not examples:
        raise ValueError("no pairs to pack")
    num_pairs = len(examples)
    sequences: list[tuple[list[int], int]] = []  # (tokens, prompt length), indexed by sequence id
    for side in ("chosen_ids", "rejected_ids"):
        for example in examples:
            prompt = list(example["prompt_ids"])
            sequences.append(((prompt + list(example[side]))[:max_length], len(prompt)))
    sizes = [len(tokens) for tokens, _ in sequences]
    rows = _pack_rows(sizes, max(row_length or max_length, max(sizes)), attention_weight)
    length = max(sum(len(sequences[s][0]) for s in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    target_mask = torch.zeros(shape, dtype=torch.bool)
    sequence_index = torch.full(shape, -1, dtype=torch.long)
    for r, seq_ids in enumerate(rows):
        offset = 0
        for seq_id in seq_ids:
            tokens, prompt_len = sequences[seq_id]
            n = len(tokens)
            span = slice(offset, offset + n)
            input_ids[r, span] = torch.tensor(tokens, dtype=torch.long)
            position_ids[r, span] = torch.arange(n)
            target_mask[r, offset + max(prompt_len, 1) : offset + n] = True
            sequence_index[r, span] = seq_id
            offset += n
        # The padding tail restarts its positions: a separate causal block that attends to itself.
        position_ids[r, offset:] = torch.arange(length - offset)
    return PackedBatch(input_ids, position_ids, target_mask, sequence_index, num_pairs)


def _first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    free: list[int] = []
    for item in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        row = next((r for r, room in enumerate(free) if room >= sizes[item]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(item)
        free[row] -= sizes[item]
    return rows


def _pack_rows(sizes: Sequence[int], max_capacity: int, attention_weight: float) -> list[list[int]]:
    """Rows of item indices, each at most ``max_capacity``, of least estimated cost.

    Filling rows up to a capacity leaves a short last row that the others are padded to, so try
    the capacities that spread the tokens evenly over 1, 2, ... more rows than the fewest.
    """
    total, longest = sum(sizes), max(sizes)
    best: list[list[int]] = []
    best_cost = math.inf
    for n_rows in range(math.ceil(total / max_capacity), len(sizes) + 1):
        capacity = min(max_capacity, max(longest, math.ceil(total / n_rows)))
        rows = _first_fit_decreasing(sizes, capacity)
        length = max(sum(sizes[i] for i in row) for row in rows)
        cost = len(rows) * length * (1.0 + attention_weight * length)
        if cost < best_cost:
            best, best_cost = rows, cost
        if capacity == longest:
            break
    return best


def attention_weight(model: Any) -> float:
    """What one query-key pair of a row costs relative to one token's dense work, for
    :func:`pack_pairs`: per token every weight but the input embedding is one multiply-add;
    per pair and layer sdpa does ``2 * hidden`` (scores and values)."""
    config = model.config.get_text_config()
    if "flash" in str(getattr(config, "_attn_implementation", "")):
        return 0.0  # varlen kernels compute only the pairs inside each sequence
    dense = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    return 2 * config.num_hidden_layers * config.hidden_size / dense


@dataclass
class PackedPreferenceCollator:
    """Collator for ``Trainer``: tokenized pairs -> :meth:`PackedBatch.as_inputs`."""

    pad_token_id: int
    max_length: int
    row_length: int | None = None
    attention_weight: float = 0.0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pack_pairs(
            examples,
            max_length=self.max_length,
            pad_token_id=self.pad_token_id,
            row_length=self.row_length,
            attention_weight=self.attention_weight,
        )
        return batch.as_inputs()


def token_logps(model: Any, batch: PackedBatch, *, fused_lm_head: bool = False) -> torch.Tensor:
    """Log-prob of every target token given its own sequence's prefix, 0 elsewhere: [rows, length].

    With ``fused_lm_head=True`` the model must carry TRL's fused LM head (``add_fused_lm_head``,
    which ``DPOTrainer`` adds): log-probs come without materialising the vocabulary-wide logits.
    Otherwise the logits are computed in full (fine for small models and tests).
    """
    # attention_mask=None on purpose: with a 2D mask transformers ignores the position restarts.
    common = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
    if fused_lm_head:
        labels = torch.where(batch.target_mask, batch.input_ids, -100)
        shifted = model(**common, labels=labels, fused_lm_head=True).log_probs  # [rows, length-1]
    else:
        logits = model(**common).logits[:, :-1].float()
        shifted = torch.gather(
            F.log_softmax(logits, dim=-1), 2, batch.input_ids[:, 1:, None]
        ).squeeze(-1)
    shifted = shifted.float()
    logps = torch.cat([torch.zeros_like(shifted[:, :1]), shifted], dim=1)
    return torch.where(batch.target_mask, logps, torch.zeros_like(logps))


def sequence_logps(logps: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Sum the target tokens' log-probs per sequence: [num_sequences] (differentiable)."""
    values = torch.where(batch.target_mask, logps, torch.zeros_like(logps))
    dump = batch.num_sequences  # an extra bucket that collects everything masked out
    index = torch.where(batch.target_mask, batch.sequence_index, dump)
    sums = values.new_zeros(dump + 1).index_add(0, index.flatten(), values.flatten())
    return sums[:dump]


def target_counts(batch: PackedBatch) -> torch.Tensor:
    """Scored tokens per sequence: [num_sequences]."""
    dump = batch.num_sequences
    index = torch.where(batch.target_mask, batch.sequence_index, dump)
    return torch.bincount(index.flatten(), minlength=dump + 1)[:dump]


class DPONLLLoss(NamedTuple):
    loss: torch.Tensor  # dpo + nll_weight * nll
    dpo: torch.Tensor
    nll: torch.Tensor  # mean NLL per chosen completion token
    chosen_rewards: torch.Tensor  # beta * (policy - reference) log-ratio, per pair, detached
    rejected_rewards: torch.Tensor


def dpo_nll_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    chosen_tokens: torch.Tensor | int,
    beta: float,
    nll_weight: float,
) -> DPONLLLoss:
    """CodeLutra's dual loss on summed completion log-probs, as TRL's ``["sigmoid", "sft"]``:
    ``-logsigmoid(beta * (chosen log-ratio - rejected log-ratio))`` averaged over pairs, plus
    ``nll_weight`` times the chosen completions' NLL averaged over their tokens."""
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    dpo = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    tokens = torch.as_tensor(chosen_tokens, device=policy_chosen.device).sum().clamp(min=1)
    nll = -policy_chosen.sum() / tokens
    return DPONLLLoss(
        loss=dpo + nll_weight * nll,
        dpo=dpo,
        nll=nll,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )
