"""Batches of preference pairs with little or no padding (CodeACT's dynamic packing), and the
DPO + NLL loss on packed batches.

* :class:`LengthBucketSampler` orders pairs so that each batch holds pairs of similar length
  (less padding for TRL's padded batches, fuller rows for packed ones).
* :func:`pack_pairs` concatenates a batch's sequences into a few rows (first-fit decreasing, the
  row length picked by a cost estimate), in one of two layouts:

  - **separate** sequences ``prompt+chosen`` and ``prompt+rejected``. ``position_ids`` restart at
    0 for every sequence and the rows go to the model with ``attention_mask=None``: transformers
    (5.19, ``masking_utils.find_packed_sequence_indices``) then reads each restart as a sequence
    boundary and builds a block-diagonal causal mask for sdpa and eager, and flash-attention uses
    its varlen kernels.
  - **shared prompt** (``share_prompt=True``): a pair's prompt is computed once, and both
    completions branch off it. A pair is laid out as ``prompt[:-1] | prompt[-1] chosen |
    prompt[-1] rejected``: the trunk ``prompt[:-1]`` is seen by both branches, each branch sees
    the trunk and itself, never the other branch. The prompt's last token starts each branch, so
    the first completion token of either side is still predicted by the token just before it in
    the row (its hidden state is the same in both branches). Positions continue the prompt's in
    each branch. Transformers cannot read this from position restarts, so :func:`token_logps`
    passes an explicit 4D mask (sdpa and eager; flash-attention's varlen kernels cannot express
    it). FIM prompts are long next to their completions (the whole prefix and suffix around the
    cursor), so this removes close to half the work.

  The padding at the end of a row is a segment of its own that attends to itself, so no query
  row is fully masked (sdpa returns NaN for those). The tests check both layouts' log-probs
  against padded ones.
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


TRUNK, CHOSEN_BRANCH, REJECTED_BRANCH = 0, 1, 2  # values of PackedBatch.branch_ids


@dataclass(frozen=True)
class PackedBatch:
    """Sequences packed into rows. Sequence ``i`` is pair ``i``'s chosen side, ``num_pairs + i`` its
    rejected side (TRL's [chosen; rejected] layout).

    ``target_mask`` marks the tokens that are scored: completion tokens, never the first token of
    a sequence (it has no prefix in its own sequence). ``sequence_index`` is the sequence of each
    token, -1 for padding (a shared prompt's tokens count as the chosen side's).

    ``segment_ids`` and ``branch_ids`` say what each token may attend to: earlier tokens of its
    own segment that are in the trunk (:data:`TRUNK`) or in its own branch. Without
    ``shared_prompts`` every segment is one sequence, all trunk.
    """

    input_ids: torch.Tensor  # [rows, length] long
    position_ids: torch.Tensor  # [rows, length] long
    target_mask: torch.Tensor  # [rows, length] bool
    sequence_index: torch.Tensor  # [rows, length] long
    num_pairs: int
    segment_ids: torch.Tensor | None = None  # [rows, length] long; None: one per sequence
    branch_ids: torch.Tensor | None = None  # [rows, length] long; None: all TRUNK
    shared_prompts: bool = False
    sequence_tokens: int | None = None  # tokens of the sequences laid out separately

    @property
    def num_sequences(self) -> int:
        return 2 * self.num_pairs

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the rows: what the model computes, less padding."""
        return int((self.sequence_index >= 0).sum())

    @property
    def data_tokens(self) -> int:
        """Prompt and completion tokens of every sequence, a shared prompt counted once per side:
        the same count for every layout of the same pairs (and what TRL's padded batches hold
        without their padding), so it is the measure of throughput."""
        return self.num_tokens if self.sequence_tokens is None else self.sequence_tokens

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The 4D mask ``[rows, 1, length, length]`` of the layout: boolean (True attends) by
        default, or additive (0 or the dtype's minimum) for ``dtype``, as eager adds it."""
        length = self.input_ids.shape[1]
        segments = self.segment_ids if self.segment_ids is not None else self.sequence_index
        branches = (
            self.branch_ids if self.branch_ids is not None else torch.zeros_like(self.input_ids)
        )
        causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
        same_segment = segments[:, :, None] == segments[:, None, :]
        visible_branch = (branches[:, None, :] == TRUNK) | (
            branches[:, :, None] == branches[:, None, :]
        )
        mask = (same_segment & visible_branch & causal)[:, None]
        if dtype is None:
            return mask
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)

    def as_inputs(self) -> dict[str, Any]:
        """The batch as a trainer's inputs dict (what a collator returns)."""
        inputs: dict[str, Any] = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "target_mask": self.target_mask,
            "sequence_index": self.sequence_index,
            "num_pairs": torch.tensor(self.num_pairs),
            "data_tokens": torch.tensor(self.data_tokens),
        }
        if self.shared_prompts:
            inputs["segment_ids"] = self.segment_ids
            inputs["branch_ids"] = self.branch_ids
        return inputs

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, Any]) -> PackedBatch:
        return cls(
            input_ids=inputs["input_ids"],
            position_ids=inputs["position_ids"],
            target_mask=inputs["target_mask"],
            sequence_index=inputs["sequence_index"],
            num_pairs=int(inputs["num_pairs"]),
            segment_ids=inputs.get("segment_ids"),
            branch_ids=inputs.get("branch_ids"),
            shared_prompts="segment_ids" in inputs,
            sequence_tokens=int(inputs["data_tokens"]) if "data_tokens" in inputs else None,
        )


class _Piece(NamedTuple):
    """A run of tokens placed together in a row."""

    tokens: list[int]
    first_position: int
    first_target: int  # offset of the first scored token; len(tokens) when none is
    sequence: int
    branch: int


def _units(
    examples: Sequence[Mapping[str, Sequence[int]]], max_length: int, share_prompt: bool
) -> tuple[list[list[_Piece]], int]:
    """The units that rows are packed from (a unit never splits across rows) and the number of
    data tokens. Each side is ``prompt + completion`` cut to ``max_length`` (keeping the start,
    like TRL)."""
    n = len(examples)
    units: list[list[_Piece]] = []
    data_tokens = 0
    sides = ((0, "chosen_ids", CHOSEN_BRANCH), (n, "rejected_ids", REJECTED_BRANCH))
    for i, example in enumerate(examples):
        prompt = list(example["prompt_ids"])[:max_length]
        completions = [
            (offset + i, list(example[key])[: max_length - len(prompt)], branch)
            for offset, key, branch in sides
        ]
        data_tokens += sum(len(prompt) + len(completion) for _, completion, _ in completions)
        if not share_prompt:
            for sequence, completion, _ in completions:
                tokens = prompt + completion
                units.append([_Piece(tokens, 0, max(len(prompt), 1), sequence, TRUNK)])
            continue
        # prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected; with no prompt, two branches
        # whose first token is not scored (nothing precedes it), as in the separate layout.
        trunk, head = prompt[:-1], prompt[-1:]
        unit = [_Piece(trunk, 0, len(trunk), i, TRUNK)] if trunk else []
        for sequence, completion, branch in completions:
            unit.append(_Piece(head + completion, len(trunk), 1, sequence, branch))
        units.append(unit)
    return units, data_tokens


def pack_pairs(
    examples: Sequence[Mapping[str, Sequence[int]]],
    *,
    max_length: int,
    pad_token_id: int,
    row_length: int | None = None,
    attention_weight: float = 0.0,
    share_prompt: bool = False,
) -> PackedBatch:
    """Pack tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, as TRL makes them).

    Each ``prompt+completion`` is cut to ``max_length`` tokens (keeping the start, like TRL), then
    the sequences (or with ``share_prompt`` the pairs, laid out as the module docstring says) are
    placed first-fit-decreasing into rows of at most ``row_length`` tokens (default
    ``max_length``; a longer pair gets a row of its own), padded to the fullest row. Of the row
    lengths between the longest unit and that bound, the one of least estimated cost ``rows *
    length * (1 + attention_weight * length)`` is used: dense layers cost per token slot, sdpa's
    attention per query-key pair of a row whatever the mask (see :func:`attention_weight`). With
    0 (varlen flash-attention wastes nothing on long rows) that is the fewest padded slots.
    """
    if not examples:
        raise ValueError("no pairs to pack")
    units, data_tokens = _units(examples, max_length, share_prompt)
    sizes = [sum(len(piece.tokens) for piece in unit) for unit in units]
    rows = _pack_rows(sizes, max(row_length or max_length, max(sizes)), attention_weight)
    length = max(sum(sizes[u] for u in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    target_mask = torch.zeros(shape, dtype=torch.bool)
    sequence_index = torch.full(shape, -1, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)  # -1: the row's padding tail
    branch_ids = torch.full(shape, TRUNK, dtype=torch.long)
    for r, unit_ids in enumerate(rows):
        offset = 0
        for u in unit_ids:
            for piece in units[u]:
                n = len(piece.tokens)
                span = slice(offset, offset + n)
                input_ids[r, span] = torch.tensor(piece.tokens, dtype=torch.long)
                position_ids[r, span] = torch.arange(piece.first_position, piece.first_position + n)
                target_mask[r, offset + piece.first_target : offset + n] = True
                sequence_index[r, span] = piece.sequence
                segment_ids[r, span] = u
                branch_ids[r, span] = piece.branch
                offset += n
        # The padding tail restarts its positions: a separate causal block that attends to itself.
        position_ids[r, offset:] = torch.arange(length - offset)
    if not share_prompt:
        return PackedBatch(input_ids, position_ids, target_mask, sequence_index, len(examples))
    return PackedBatch(
        input_ids,
        position_ids,
        target_mask,
        sequence_index,
        len(examples),
        segment_ids=segment_ids,
        branch_ids=branch_ids,
        shared_prompts=True,
        sequence_tokens=data_tokens,
    )


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
    the capacities that spread the tokens evenly over 1, 2, ... more rows than the fewest, and a
    few just above each (first-fit decreasing often needs a little slack to reach that count).
    """
    total, longest = sum(sizes), max(sizes)
    best: list[list[int]] = []
    best_cost = math.inf
    slack_step = max(1, longest // 8)
    for n_rows in range(math.ceil(total / max_capacity), len(sizes) + 1):
        even = max(longest, math.ceil(total / n_rows))
        capacities = sorted(
            {min(max_capacity, even + slack) for slack in range(0, longest + 1, slack_step)}
        )
        for capacity in capacities:
            rows = _first_fit_decreasing(sizes, capacity)
            length = max(sum(sizes[i] for i in row) for row in rows)
            cost = len(rows) * length * (1.0 + attention_weight * length)
            if cost < best_cost:
                best, best_cost = rows, cost
        if even == longest:
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


def supports_shared_prompts(model: Any) -> bool:
    """Whether the model's attention takes the explicit 4D mask that shared prompts need
    (sdpa and eager do; flash-attention's varlen kernels cannot express branches)."""
    implementation = str(getattr(model.config.get_text_config(), "_attn_implementation", ""))
    return implementation in ("sdpa", "eager")


@dataclass
class PackedPreferenceCollator:
    """Collator for ``Trainer``: tokenized pairs -> :meth:`PackedBatch.as_inputs`."""

    pad_token_id: int
    max_length: int
    row_length: int | None = None
    attention_weight: float = 0.0
    share_prompt: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pack_pairs(
            examples,
            max_length=self.max_length,
            pad_token_id=self.pad_token_id,
            row_length=self.row_length,
            attention_weight=self.attention_weight,
            share_prompt=self.share_prompt,
        )
        inputs = batch.as_inputs()
        if any("weight" in e for e in examples):
            # Per pair, in the examples' order (pair i is sequences i and num_pairs + i).
            inputs["pair_weights"] = torch.tensor(
                [float(e.get("weight", 1.0)) for e in examples], dtype=torch.float32
            )
        return inputs


def token_logps(model: Any, batch: PackedBatch, *, fused_lm_head: bool = False) -> torch.Tensor:
    """Log-prob of every target token given its own sequence's prefix, 0 elsewhere: [rows, length].

    With ``fused_lm_head=True`` the model must carry TRL's fused LM head (``add_fused_lm_head``,
    which ``DPOTrainer`` adds): log-probs come without materialising the vocabulary-wide logits.
    Otherwise the logits are computed in full (fine for small models and tests).
    """
    # Separate sequences: attention_mask=None on purpose, as transformers ignores the position
    # restarts when given a 2D mask. Shared prompts: the explicit 4D mask of the branches.
    common: dict[str, Any] = {
        "input_ids": batch.input_ids,
        "position_ids": batch.position_ids,
        "use_cache": False,
    }
    if batch.shared_prompts:
        inner = getattr(model, "module", model)  # DDP's wrapper (trainer.launch) has no config
        if not supports_shared_prompts(inner):
            raise ValueError(
                "shared-prompt batches need sdpa or eager attention; pack with "
                "share_prompt=False for flash-attention"
            )
        implementation = inner.config.get_text_config()._attn_implementation
        dtype = None if implementation == "sdpa" else inner.dtype
        common["attention_mask"] = batch.attention_mask(dtype)
    if fused_lm_head:
        labels = torch.where(batch.target_mask, batch.input_ids, -100)
        shifted = model(**common, labels=labels, fused_lm_head=True).log_probs  # [rows, length-1]
    else:
        logits = _at_least_float32(model(**common).logits[:, :-1])
        shifted = torch.gather(
            F.log_softmax(logits, dim=-1), 2, batch.input_ids[:, 1:, None]
        ).squeeze(-1)
    shifted = _at_least_float32(shifted)
    logps = torch.cat([torch.zeros_like(shifted[:, :1]), shifted], dim=1)
    return torch.where(batch.target_mask, logps, torch.zeros_like(logps))


def _at_least_float32(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.promote_types(values.dtype, torch.float32))


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
    weights: torch.Tensor | None = None,
) -> DPONLLLoss:
    """CodeLutra's dual loss on summed completion log-probs, as TRL's ``["sigmoid", "sft"]``:
    ``-logsigmoid(beta * (chosen log-ratio - rejected log-ratio))`` averaged over pairs, plus
    ``nll_weight`` times the chosen completions' NLL averaged over their tokens. ``weights``
    (per pair; None: all 1) scale each pair's terms in both: a judge pair weighs less than an
    execution-verified one (``trainer.pairs.Pair.weight``)."""
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    w = (
        torch.ones_like(policy_chosen)
        if weights is None
        else weights.to(device=policy_chosen.device, dtype=policy_chosen.dtype)
    )
    dpo = (-F.logsigmoid(beta * (chosen_logratios - rejected_logratios)) * w).mean()
    tokens = torch.as_tensor(chosen_tokens, device=policy_chosen.device).sum().clamp(min=1)
    nll = -(policy_chosen * w).sum() / tokens
    return DPONLLLoss(
        loss=dpo + nll_weight * nll,
        dpo=dpo,
        nll=nll,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )
