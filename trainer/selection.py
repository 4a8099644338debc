"""CDAS (CodeACT's complexity- and diversity-aware selection) over preference pairs.

Training on every pair wastes steps on near-duplicates and on pairs the model finds trivial.
CDAS keeps a diverse, hard subset:

* **diversity**: each pair's prompt is embedded with the policy model itself (the attention-
  masked mean of its last hidden states: no separate embedding model to download) and the
  prompts are clustered with k-means, k ~ sqrt(n/2);
* **complexity**: IFD, Instruction-Following Difficulty ("From Quantity to Quality", Li et al.
  2024, as CodeACT uses it): the mean token cross-entropy of the chosen text given the prompt,
  divided by that of the chosen text alone, under the current policy (base + adapter). A high
  IFD means the prompt helps the model little: the pair is hard. IFD >= 1 means the prompt does
  not help at all (noise, or a text the model predicts anyway) and the pair is dropped;
* within each cluster the top ``fraction`` by IFD are kept (at least one per cluster), then no
  repository may hold more than ``max_repository_share`` of the selection, so one busy team
  does not shape the adapter for everybody.

:func:`score_pairs` does the model work (one batched forward pass with the prompt, one
without, no gradients); :func:`select_from_scores` is the pure selection, tested on its own.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.pairs import Pair

__all__ = [
    "PairScore",
    "Scores",
    "SelectionResult",
    "default_n_clusters",
    "kmeans",
    "score_pairs",
    "select_from_scores",
    "select_pairs",
]


@dataclass
class Scores:
    """Model-derived numbers for each pair, in the order of the pairs."""

    embeddings: np.ndarray  # (n, hidden) float32: the prompt's mean last hidden state
    conditioned_loss: np.ndarray  # (n,) mean CE of chosen given the prompt
    unconditioned_loss: np.ndarray  # (n,) mean CE of chosen alone

    @property
    def ifd(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.conditioned_loss / self.unconditioned_loss


@dataclass(frozen=True)
class PairScore:
    ifd: float
    conditioned_loss: float
    unconditioned_loss: float
    cluster: int | None  # None: dropped before clustering
    selected: bool
    # Why not selected: "not_finite", "ifd_ge_1", "cluster_fraction", "repository_cap".
    reason: str | None


@dataclass
class SelectionResult:
    pairs: list[Pair]  # the selected pairs, in input order
    scores: dict[str, PairScore]  # every input pair, by id
    funnel: dict[str, Any]


# -- model scores -----------------------------------------------------------------------------


def score_pairs(
    pairs: Sequence[Pair],
    *,
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    batch_size: int = 4,
    max_length: int = 1024,
    max_response_tokens: int = 256,
    device: str | None = None,
) -> Scores:
    """Prompt embeddings and IFD losses of ``pairs`` under the model (plus adapter).

    Two forward passes per pair: prompt+chosen (the prompt's hidden states give the embedding,
    the chosen tokens the conditioned loss; a causal model's prompt states do not depend on
    what follows) and start-token+chosen (the unconditioned loss). Starting the second with the
    model's document-start token makes both losses cover exactly the same chosen tokens.
    A round gives pairs already fitted to ``max_length`` (:mod:`trainer.budget`: FIM prompts
    trimmed on both sides, completions whole), so nothing is cut here; for other callers a
    chosen text keeps its first ``max_response_tokens`` tokens and a prompt then too long its
    end.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not 0 < max_response_tokens < max_length:
        raise ValueError("need 0 < max_response_tokens < max_length")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive: {batch_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # float32 on the CPU (bf16 there is slow and coarse); bf16 on a GPU.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.to(device).eval()

    start_id = next(
        (
            i
            for i in (
                tokenizer.bos_token_id,
                getattr(model.config, "bos_token_id", None),
                tokenizer.eos_token_id,
            )
            if i is not None
        ),
        None,
    )
    if start_id is None:
        raise ValueError(f"{model_dir}: no bos or eos token to start a sequence with")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_id

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    conditioned: list[tuple[list[int], int]] = []  # (sequence, prompt length)
    alone: list[tuple[list[int], int]] = []
    for pair in pairs:
        response = ids(pair.chosen)[:max_response_tokens]
        prompt = ids(pair.prompt)[-(max_length - len(response)) :]
        conditioned.append((prompt + response, len(prompt)))
        alone.append(([start_id, *response], 1))

    hidden = int(model.config.get_text_config().hidden_size)
    embeddings = np.zeros((len(pairs), hidden), dtype=np.float32)
    cond_loss = np.full(len(pairs), np.nan)
    alone_loss = np.full(len(pairs), np.nan)
    with torch.inference_mode():
        for batch in _batches(conditioned, batch_size):
            emb, loss = _forward(model, [conditioned[i] for i in batch], pad_id, device, True)
            embeddings[batch] = emb
            cond_loss[batch] = loss
        for batch in _batches(alone, batch_size):
            _, loss = _forward(model, [alone[i] for i in batch], pad_id, device, False)
            alone_loss[batch] = loss
    return Scores(embeddings, cond_loss, alone_loss)


def _batches(items: Sequence[tuple[list[int], int]], size: int) -> list[list[int]]:
    # Similar lengths together: less padding.
    order = sorted(range(len(items)), key=lambda i: (len(items[i][0]), i))
    return [order[i : i + size] for i in range(0, len(order), size)]


def _forward(
    model: Any,
    batch: Sequence[tuple[list[int], int]],
    pad_id: int,
    device: str,
    want_embeddings: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean prompt hidden state and mean response cross-entropy of each (sequence, prompt
    length). Left padding puts every response at the end, so only the last logits are needed
    (``logits_to_keep``): a 150k vocabulary times every position would not fit."""
    import torch
    import torch.nn.functional as F

    n = len(batch)
    width = max(len(seq) for seq, _ in batch)
    response_lens = [len(seq) - p for seq, p in batch]
    r_max = max(response_lens)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    prompt_mask = torch.zeros((n, width), dtype=torch.float32)
    for i, (seq, p) in enumerate(batch):
        start = width - len(seq)
        input_ids[i, start:] = torch.tensor(seq, dtype=torch.long)
        mask[i, start:] = 1
        prompt_mask[i, start : start + p] = 1.0
    # Positions count real tokens only, as if each sequence were alone.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position_ids.to(device),
        output_hidden_states=want_embeddings,
        logits_to_keep=r_max + 1,
    )
    losses = np.full(n, np.nan)
    if r_max > 0:
        logits = out.logits[:, :-1].float()  # position t predicts token t + 1
        targets = input_ids[:, width - r_max :].to(device)
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        ).view(n, r_max)
        valid = torch.zeros((n, r_max), dtype=torch.float32, device=ce.device)
        for i, r in enumerate(response_lens):
            valid[i, r_max - r :] = 1.0
        counts = valid.sum(1)
        mean = (ce * valid).sum(1) / counts.clamp(min=1)
        losses = np.where(counts.cpu().numpy() > 0, mean.cpu().numpy(), np.nan)
    embeddings = np.zeros((n, 0), dtype=np.float32)
    if want_embeddings:
        states = out.hidden_states[-1].float()
        weights = prompt_mask.to(states.device).unsqueeze(-1)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        embeddings = pooled.cpu().numpy().astype(np.float32)
    return embeddings, losses


# -- clustering -------------------------------------------------------------------------------


def default_n_clusters(n: int) -> int:
    """k ~ sqrt(n/2), the usual rule of thumb (CodeACT leaves k to the user)."""
    return max(1, round(math.sqrt(n / 2)))


def kmeans(x: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    """Cluster labels of the rows of ``x`` (0..k'-1, numbered by first appearance).

    A small seeded k-means++ Lloyd in numpy: one implementation everywhere, so the same seed gives
    the same clusters on every machine. k is capped at the number of distinct rows.
    """
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = max(1, min(k, len(np.unique(x, axis=0))))
    labels = np.zeros(n, dtype=np.int64) if k == 1 else _kmeans_numpy(x, k, seed=seed)
    # Renumber by first appearance so equal clusterings give equal labels.
    mapping: dict[int, int] = {}
    for label in labels:
        mapping.setdefault(int(label), len(mapping))
    return np.array([mapping[int(label)] for label in labels], dtype=np.int64)


def _kmeans_numpy(
    x: np.ndarray, k: int, *, seed: int, n_init: int = 4, max_iter: int = 100
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    best_labels, best_inertia = np.zeros(len(x), dtype=np.int64), math.inf
    for _ in range(n_init):
        centers = _kmeans_plus_plus(x, k, rng)
        labels = np.full(len(x), -1, dtype=np.int64)
        for _ in range(max_iter):
            dist = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
            new = dist.argmin(1)
            if np.array_equal(new, labels):
                break
            labels = new
            for c in range(k):
                members = x[labels == c]
                if len(members):
                    centers[c] = members.mean(0)
                else:  # an empty cluster takes the point farthest from its center
                    far = int(dist[np.arange(len(x)), labels].argmax())
                    centers[c] = x[far]
        inertia = float(((x - centers[labels]) ** 2).sum())
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = ((x[:, None, :] - np.array(centers)[None, :, :]) ** 2).sum(-1).min(1)
        total = d2.sum()
        index = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centers.append(x[index])
    return np.array(centers, dtype=np.float64)


# -- selection --------------------------------------------------------------------------------


def select_from_scores(
    pairs: Sequence[Pair],
    scores: Scores,
    *,
    fraction: float = 0.5,
    n_clusters: int | None = None,
    max_repository_share: float = 0.5,
    repositories: Mapping[str, str | None] | None = None,
    seed: int = 0,
) -> SelectionResult:
    """The CDAS selection from precomputed scores (see the module docstring).

    A cluster of m pairs keeps round(fraction * m) of them (halves round up), at least one.

    Pairs whose repository is unknown (None, or ``repositories`` not given) are never capped;
    the cap applies only while some other pair remains (a lone repository has no share to cap).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]: {fraction}")
    if not 0 < max_repository_share <= 1:
        raise ValueError(f"max_repository_share must be in (0, 1]: {max_repository_share}")
    ids = [p.id for p in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError("pair ids must be unique")
    ifd = scores.ifd
    reason: list[str | None] = [None] * len(pairs)
    for i, value in enumerate(ifd):
        if not np.isfinite(value):
            reason[i] = "not_finite"
        elif value >= 1.0:
            reason[i] = "ifd_ge_1"
    valid = [i for i in range(len(pairs)) if reason[i] is None]

    cluster: list[int | None] = [None] * len(pairs)
    k_used = 0
    if valid:
        x = scores.embeddings[valid].astype(np.float64)
        # Cosine geometry: the direction of a mean hidden state carries the topic.
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        k = n_clusters if n_clusters is not None else default_n_clusters(len(valid))
        labels = kmeans(x, k, seed=seed)
        k_used = int(labels.max()) + 1
        for i, label in zip(valid, labels, strict=True):
            cluster[i] = int(label)

    # Top fraction by IFD in each cluster (ties: input order), at least one.
    selected: list[int] = []
    for c in range(k_used):
        members = sorted((i for i in valid if cluster[i] == c), key=lambda i: (-ifd[i], i))
        keep = max(1, int(fraction * len(members) + 0.5))
        selected += members[:keep]
        for i in members[keep:]:
            reason[i] = "cluster_fraction"

    # Repository cap: drop the lowest-IFD pairs of the most over-represented repository until
    # none holds more than its share.
    repo = {i: (repositories or {}).get(pairs[i].id) for i in range(len(pairs))}
    chosen = set(selected)
    while True:
        counts = Counter(repo[i] for i in chosen if repo[i] is not None)
        total = len(chosen)
        over = [r for r, n in counts.items() if n > max_repository_share * total and n < total]
        if not over:
            break
        worst = max(over, key=lambda r: (counts[r], r))
        victim = min((i for i in chosen if repo[i] == worst), key=lambda i: (ifd[i], -i))
        chosen.remove(victim)
        reason[victim] = "repository_cap"

    result_scores = {
        pairs[i].id: PairScore(
            ifd=float(ifd[i]),
            conditioned_loss=float(scores.conditioned_loss[i]),
            unconditioned_loss=float(scores.unconditioned_loss[i]),
            cluster=cluster[i],
            selected=i in chosen,
            reason=reason[i],
        )
        for i in range(len(pairs))
    }
    dropped = Counter(r for r in reason if r is not None)
    funnel: dict[str, Any] = {
        "pairs": len(pairs),
        "not_finite": dropped["not_finite"],
        "ifd_ge_1": dropped["ifd_ge_1"],
        "clustered": len(valid),
        "clusters": k_used,
        "cluster_fraction": dropped["cluster_fraction"],
        "repository_cap": dropped["repository_cap"],
        "selected": len(chosen),
    }
    return SelectionResult(
        pairs=[pairs[i] for i in sorted(chosen)], scores=result_scores, funnel=funnel
    )


def select_pairs(
    pairs: Sequence[Pair],
    *,
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    fraction: float = 0.5,
    n_clusters: int | None = None,
    max_repository_share: float = 0.5,
    repositories: Mapping[str, str | None] | None = None,
    seed: int = 0,
    batch_size: int = 4,
    max_length: int = 1024,
    max_response_tokens: int | None = None,
) -> SelectionResult:
    """Score ``pairs`` with the model in ``model_dir`` (+ ``adapter_dir``) and select a diverse,
    hard subset. ``repositories`` maps pair id to repository (``PairBuildResult.repositories``).
    ``max_response_tokens`` defaults to ``max_length - 1``: the whole chosen text is scored,
    as it is trained (fit the pairs to ``max_length`` first, see :mod:`trainer.budget`).
    """
    if not pairs:
        return select_from_scores(
            pairs,
            Scores(np.zeros((0, 0), np.float32), np.zeros(0), np.zeros(0)),
            fraction=fraction,
            max_repository_share=max_repository_share,
        )
    scores = score_pairs(
        pairs,
        model_dir=model_dir,
        adapter_dir=adapter_dir,
        batch_size=batch_size,
        max_length=max_length,
        max_response_tokens=max_response_tokens or max_length - 1,
    )
    return select_from_scores(
        pairs,
        scores,
        fraction=fraction,
        n_clusters=n_clusters,
        max_repository_share=max_repository_share,
        repositories=repositories,
        seed=seed,
    )
