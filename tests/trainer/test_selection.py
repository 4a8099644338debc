"""CDAS selection: embeddings and IFD from a tiny random Qwen2 (built by the tests, CPU), and
the selection itself on constructed scores (IFD filter, top fraction per cluster, repository
cap, determinism)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import trainer.selection as select_module
from server.engine.fim import FimFormat
from tests.utils.tiny_model import build_random_lora, build_tiny_model
from trainer.pairs import Pair
from trainer.selection import (
    Scores,
    default_n_clusters,
    kmeans,
    score_pairs,
    select_from_scores,
    select_pairs,
)

# scikit-learn is optional: without it the selection uses its own k-means.


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_lora(model_dir, tmp_path_factory.mktemp("tiny") / "adapter")


def make_pairs(n: int) -> list[Pair]:
    pairs = []
    for i in range(n):
        body = "    total = 0\n" * (i % 4)
        pairs.append(
            Pair(
                id=f"p{i}",
                prompt=FimFormat().build(f"def add_{i}(a, b):\n{body}    ", "\n"),
                chosen="return a + b" if i % 2 else "return sum([a, b])",
                rejected="return a - b",
                source="ci",
            )
        )
    return pairs


# -- model scores -----------------------------------------------------------------------------


def test_scores_shape_finite_and_batch_invariant(model_dir: Path) -> None:
    pairs = make_pairs(7)
    scores = score_pairs(pairs, model_dir=model_dir, batch_size=3)
    assert scores.embeddings.shape == (7, 128)  # the tiny model's hidden size
    assert scores.embeddings.dtype == np.float32
    assert np.isfinite(scores.embeddings).all()
    assert np.isfinite(scores.ifd).all() and (scores.ifd > 0).all()
    assert (scores.conditioned_loss > 0).all() and (scores.unconditioned_loss > 0).all()
    # Left padding with real positions: batching changes nothing.
    one = score_pairs(pairs, model_dir=model_dir, batch_size=1)
    np.testing.assert_allclose(one.conditioned_loss, scores.conditioned_loss, rtol=1e-4)
    np.testing.assert_allclose(one.unconditioned_loss, scores.unconditioned_loss, rtol=1e-4)
    np.testing.assert_allclose(one.embeddings, scores.embeddings, rtol=1e-3, atol=1e-4)


def test_losses_and_embedding_match_a_plain_forward(model_dir: Path) -> None:
    """Against transformers' own loss and hidden states on the unpadded sequence."""
    (pair,) = make_pairs(1)
    scores = score_pairs([pair], model_dir=model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompt = tokenizer(pair.prompt, add_special_tokens=False)["input_ids"]
    chosen = tokenizer(pair.chosen, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ids = torch.tensor([prompt + chosen])
        labels = torch.tensor([[-100] * len(prompt) + chosen])
        out = model(input_ids=ids, labels=labels, output_hidden_states=True)
        start = model.config.bos_token_id  # the document-start token the scorer uses
        alone = torch.tensor([[start, *chosen]])
        alone_loss = model(input_ids=alone, labels=torch.tensor([[-100, *chosen]])).loss
        prompt_only = model(input_ids=torch.tensor([prompt]), output_hidden_states=True)
    assert scores.conditioned_loss[0] == pytest.approx(out.loss.item(), rel=1e-4)
    assert scores.unconditioned_loss[0] == pytest.approx(alone_loss.item(), rel=1e-4)
    assert scores.ifd[0] == pytest.approx(out.loss.item() / alone_loss.item(), rel=1e-4)
    expected = prompt_only.hidden_states[-1][0].mean(0).numpy()
    np.testing.assert_allclose(scores.embeddings[0], expected, rtol=1e-3, atol=1e-4)


def test_adapter_is_the_policy(model_dir: Path, adapter_dir: Path) -> None:
    pairs = make_pairs(3)
    base = score_pairs(pairs, model_dir=model_dir)
    tuned = score_pairs(pairs, model_dir=model_dir, adapter_dir=adapter_dir)
    assert np.isfinite(tuned.ifd).all()
    assert not np.allclose(base.conditioned_loss, tuned.conditioned_loss)


def test_select_pairs_end_to_end_is_deterministic(model_dir: Path) -> None:
    pairs = make_pairs(12)
    repos = {p.id: ("github.com/a/big" if i < 9 else "github.com/b/small") for i, p in
             enumerate(pairs)}  # fmt: skip
    first = select_pairs(pairs, model_dir=model_dir, repositories=repos, seed=1)
    again = select_pairs(pairs, model_dir=model_dir, repositories=repos, seed=1)
    assert [p.id for p in first.pairs] == [p.id for p in again.pairs]
    assert first.scores == again.scores
    assert set(first.scores) == {p.id for p in pairs}
    assert {p.id for p in first.pairs} == {k for k, s in first.scores.items() if s.selected}
    for score in first.scores.values():
        assert np.isfinite(score.ifd)
        assert (score.reason == "ifd_ge_1") == (score.ifd >= 1)
    f = first.funnel
    assert f["pairs"] == 12 and f["selected"] == len(first.pairs)
    assert f["clustered"] + f["ifd_ge_1"] + f["not_finite"] == 12
    assert f["selected"] == f["clustered"] - f["cluster_fraction"] - f["repository_cap"]


def test_select_pairs_drops_ifd_at_least_one(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the losses patched: the prompt makes p1 no easier (IFD 1) and p2 harder (1.5)."""
    pairs = make_pairs(4)

    def fake_scores(pairs: list[Pair], **kwargs: object) -> Scores:
        assert kwargs["model_dir"] == model_dir
        return Scores(
            embeddings=np.ones((4, 8), dtype=np.float32),
            conditioned_loss=np.array([0.5, 2.0, 3.0, 0.9]),
            unconditioned_loss=np.array([1.0, 2.0, 2.0, 1.0]),
        )

    monkeypatch.setattr(select_module, "score_pairs", fake_scores)
    result = select_pairs(pairs, model_dir=model_dir, fraction=1.0)
    assert [p.id for p in result.pairs] == ["p0", "p3"]
    assert result.scores["p1"].reason == "ifd_ge_1" and result.scores["p1"].ifd == 1.0
    assert result.scores["p2"].reason == "ifd_ge_1" and result.scores["p2"].cluster is None
    assert result.funnel["ifd_ge_1"] == 2


def test_no_pairs_loads_no_model(tmp_path: Path) -> None:
    result = select_pairs([], model_dir=tmp_path / "missing")
    assert result.pairs == [] and result.funnel["selected"] == 0


# -- selection on constructed scores ----------------------------------------------------------


def two_groups(ifd: list[float], sizes: tuple[int, int]) -> tuple[list[Pair], Scores]:
    """Pairs whose embeddings form two well-separated groups, with the given IFDs."""
    rng = np.random.default_rng(0)
    n = sum(sizes)
    centers = [np.eye(16)[0] * 10, np.eye(16)[1] * 10]
    emb = np.concatenate(
        [centers[g] + rng.normal(0, 0.1, (size, 16)) for g, size in enumerate(sizes)]
    ).astype(np.float32)
    pairs = [Pair(id=f"p{i}", prompt=f"q{i}", chosen="c", rejected="r", source="ci")
             for i in range(n)]  # fmt: skip
    return pairs, Scores(emb, np.array(ifd), np.ones(n))


def test_top_fraction_by_ifd_within_each_cluster() -> None:
    ifd = [0.9, 0.2, 0.5, 0.8, 0.3, 0.1] + [0.4, 0.95, 0.6, 0.7]
    pairs, scores = two_groups(ifd, (6, 4))
    result = select_from_scores(pairs, scores, fraction=0.5, n_clusters=2, seed=0)
    # Group one keeps its top 3 (0.9, 0.8, 0.5), group two its top 2 (0.95, 0.7).
    assert [p.id for p in result.pairs] == ["p0", "p2", "p3", "p7", "p9"]
    clusters = [result.scores[f"p{i}"].cluster for i in range(10)]
    assert len(set(clusters[:6])) == 1 and len(set(clusters[6:])) == 1
    assert clusters[0] != clusters[6]
    assert result.scores["p1"].reason == "cluster_fraction"
    assert result.funnel["clusters"] == 2 and result.funnel["cluster_fraction"] == 5


def test_at_least_one_per_cluster() -> None:
    pairs, scores = two_groups([0.5, 0.6, 0.7, 0.2], (3, 1))
    result = select_from_scores(pairs, scores, fraction=0.1, n_clusters=2)
    assert [p.id for p in result.pairs] == ["p2", "p3"]


def test_non_finite_ifd_is_dropped() -> None:
    pairs, scores = two_groups([0.5, 0.6, 0.7], (2, 1))
    scores.unconditioned_loss = np.array([1.0, 0.0, np.nan])
    result = select_from_scores(pairs, scores, fraction=1.0)
    assert [p.id for p in result.pairs] == ["p0"]
    assert result.funnel["not_finite"] == 2


def test_repository_cap() -> None:
    ifd = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    pairs, scores = two_groups(ifd, (8, 0))
    repos = {f"p{i}": "github.com/a/big" for i in range(6)}
    repos.update({"p6": "github.com/b/small", "p7": None})
    result = select_from_scores(
        pairs, scores, fraction=1.0, n_clusters=1, max_repository_share=0.5, repositories=repos
    )
    kept = [p.id for p in result.pairs]
    # big may hold at most half: with small and the unknown one that is 2 of 4, its best two.
    assert kept == ["p0", "p1", "p6", "p7"]
    assert {result.scores[f"p{i}"].reason for i in range(2, 6)} == {"repository_cap"}
    assert result.funnel["repository_cap"] == 4
    big = sum(repos[k] == "github.com/a/big" for k in kept)
    assert big <= 0.5 * len(kept)


def test_repository_cap_leaves_a_lone_repository_and_unknowns_alone() -> None:
    pairs, scores = two_groups([0.5, 0.6, 0.7], (3, 0))
    alone = select_from_scores(
        pairs, scores, fraction=1.0, repositories={p.id: "github.com/a/only" for p in pairs}
    )
    assert len(alone.pairs) == 3
    unknown = select_from_scores(pairs, scores, fraction=1.0)
    assert len(unknown.pairs) == 3


def test_deterministic_with_a_seed() -> None:
    rng = np.random.default_rng(5)
    n = 40
    pairs = [Pair(id=f"p{i}", prompt="q", chosen="c", rejected="r", source="ci")
             for i in range(n)]  # fmt: skip
    scores = Scores(rng.normal(size=(n, 8)).astype(np.float32), rng.uniform(0.1, 1.2, n),
                    np.ones(n))  # fmt: skip
    a = select_from_scores(pairs, scores, seed=7)
    b = select_from_scores(pairs, scores, seed=7)
    assert a.pairs == b.pairs and a.scores == b.scores
    assert a.funnel["clusters"] == default_n_clusters(a.funnel["clustered"])


def test_kmeans_numpy_and_cluster_count() -> None:
    x = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0], [0.0, 0.1]])
    labels = kmeans(x, 2, seed=0)
    assert labels.tolist() == [0, 0, 1, 1, 0]  # numbered by first appearance
    # k is capped at the number of distinct points.
    assert kmeans(np.zeros((4, 2)), 3, seed=0).tolist() == [0, 0, 0, 0]
    assert default_n_clusters(1) == 1 and default_n_clusters(50) == 5
    assert default_n_clusters(200) == 10


def test_without_sklearn_numpy_kmeans_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import fails
    x = np.array([[0.0, 0.0], [10.0, 10.0], [0.1, 0.0], [10.0, 10.1]])
    assert kmeans(x, 2, seed=0).tolist() == [0, 1, 0, 1]


def test_bad_arguments() -> None:
    pairs, scores = two_groups([0.5, 0.6], (2, 0))
    with pytest.raises(ValueError):
        select_from_scores(pairs, scores, fraction=0)
    with pytest.raises(ValueError):
        select_from_scores(pairs, scores, max_repository_share=1.5)
    with pytest.raises(ValueError):
        select_from_scores(pairs + pairs[:1], scores)
