"""RasSampler against a literal re-statement of upstream's ras_sampling (Python loop + torch.multinomial).

The sampler replaces multinomial by an exponential race over a pre-drawn pool; these tests pin down that
the tokens, picks, candidate sets and fallbacks are the same as upstream's for the same seed, across many
steps, frequent fallbacks and several pool refills.
"""

from __future__ import annotations

import pytest
import torch

from cosyapp.backends.cosyvoice2.sampling import RasSampler, sample_rows, stable_top_k

VOCAB = 6564
EOS = 6561
TOP_P, TOP_K, WIN_SIZE, TAU_R = 0.8, 25, 10, 0.1


def upstream_ras(scores: torch.Tensor, decoded: list[int], generator: torch.Generator) -> tuple[int, int, int, bool]:
    """Upstream's algorithm step by step: returns (token, nucleus pick, number of candidates, fallback)."""
    scores = scores.clone()
    probs, ids = [], []
    cum = 0.0
    sorted_probs, sorted_ids = scores.softmax(dim=0).sort(descending=True, stable=True)
    for i in range(len(sorted_ids)):
        if cum < TOP_P and len(probs) < TOP_K:
            cum += sorted_probs[i]
            probs.append(sorted_probs[i])
            ids.append(sorted_ids[i])
        else:
            break
    pick = torch.stack(ids)[torch.stack(probs).multinomial(1, replacement=True, generator=generator)]
    repeats = (torch.tensor(decoded[-WIN_SIZE:], dtype=torch.long) == pick).sum().item()
    if repeats >= WIN_SIZE * TAU_R:
        scores[pick] = float("-inf")
        token = scores.softmax(dim=0).multinomial(1, replacement=True, generator=generator)
        return int(token), int(pick), len(probs), True
    return int(pick), int(pick), len(probs), False


def step_scores(step: int, data_gen: torch.Generator, favourites: torch.Tensor) -> torch.Tensor:
    """Peaked log-probs (logit std 4) with a few favourite ids boosted, so picks repeat within the window
    and the RAS fallback fires often; EOS is masked on even steps like before min_len."""
    logits = torch.randn(VOCAB, generator=data_gen) * 4.0
    logits[favourites] += 12.0
    scores = logits.log_softmax(dim=0)
    if step % 2 == 0:
        scores[EOS] = float("-inf")
    return scores


@pytest.mark.parametrize("seed", [0, 1234, 2024])
def test_matches_upstream_algorithm(seed):
    data_gen = torch.Generator().manual_seed(seed + 1)
    favourites = torch.randint(0, EOS, (4,), generator=data_gen)
    upstream_gen = torch.Generator().manual_seed(seed)
    sampler = RasSampler(TOP_P, TOP_K, WIN_SIZE, TAU_R, generator=torch.Generator().manual_seed(seed))
    decoded: list[int] = []
    n_fallback = 0
    for step in range(160):
        scores = step_scores(step, data_gen, favourites)
        token, pick, num_candidates, fallback = upstream_ras(scores, decoded, upstream_gen)
        sample = sampler(scores)
        assert (sample.token_id, int(sample.nucleus_pick), sample.num_candidates, sample.fallback) == \
            (token, pick, num_candidates, fallback), f"step {step}"
        decoded.append(token)
        n_fallback += fallback
    # Each fallback consumes a full vocabulary of draws: this many force several pool refills.
    assert n_fallback >= 20


def test_candidate_rule_includes_the_token_that_crosses_top_p():
    probs = torch.tensor([0.5, 0.29, 0.2, 0.01])
    sample = RasSampler(TOP_P, TOP_K, WIN_SIZE, TAU_R, generator=torch.Generator().manual_seed(0))(probs.log())
    # cum before adding: 0, 0.5, 0.79 (< 0.8, kept), 0.99 (stop)
    assert sample.num_candidates == 3
    assert sample.sorted_ids[:3].tolist() == [0, 1, 2]
    assert sample.token_id in (0, 1, 2)


def test_candidate_count_is_capped_at_top_k():
    sample = RasSampler(TOP_P, TOP_K, WIN_SIZE, TAU_R, generator=torch.Generator().manual_seed(0))(torch.zeros(1000))
    assert sample.num_candidates == TOP_K


def test_ties_keep_ascending_ids():
    scores = torch.full((100,), -10.0)
    scores[[70, 30, 50]] = 0.0
    sample = RasSampler(TOP_P, TOP_K, WIN_SIZE, TAU_R, generator=torch.Generator().manual_seed(0))(scores)
    assert sample.sorted_ids[:3].tolist() == [30, 50, 70]


def test_fallback_while_the_pick_is_in_the_window():
    scores = torch.full((VOCAB,), -30.0)
    scores[7] = 0.0  # the nucleus always picks 7
    scores[EOS] = float("-inf")
    scores = scores.log_softmax(0)
    sampler = RasSampler(TOP_P, TOP_K, WIN_SIZE, TAU_R, generator=torch.Generator().manual_seed(3))
    first = sampler(scores)
    assert (first.token_id, first.fallback) == (7, False)
    # 7 stays among the last WIN_SIZE decoded ids for the next WIN_SIZE steps: each one falls back to a
    # full-vocabulary draw that can be neither 7 nor the masked EOS.
    for _ in range(WIN_SIZE):
        sample = sampler(scores)
        assert sample.fallback and int(sample.nucleus_pick) == 7
        assert sample.token_id not in (7, EOS)
    after = sampler(scores)
    assert (after.token_id, after.fallback) == (7, False)


def test_default_generator_is_the_global_one():
    scores = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5)).mul(4).log_softmax(0)
    torch.manual_seed(11)
    from_global = [RasSampler(TOP_P, TOP_K, WIN_SIZE, TAU_R)(scores).token_id for _ in range(5)]
    seeded = torch.Generator().manual_seed(11)
    from_seeded = [RasSampler(TOP_P, TOP_K, WIN_SIZE, TAU_R, generator=seeded)(scores).token_id for _ in range(5)]
    assert from_global == from_seeded


def test_half_precision_scores_are_sampled_in_float32():
    scores = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5)).mul(4).log_softmax(0)
    sample = RasSampler(TOP_P, TOP_K, WIN_SIZE, TAU_R, generator=torch.Generator().manual_seed(0))(scores.bfloat16())
    assert sample.sorted_probs.dtype == torch.float32
    assert 0 <= sample.token_id < VOCAB


def test_stable_top_k_is_the_head_of_the_full_stable_sort() -> None:
    """Random vocabularies with repeated probabilities inside the top 25: same values and ids, equal
    probabilities ordered by id, as the full stable sort upstream does."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(6564, generator=generator)
        top = logits.topk(40).indices
        logits[top[3:9]] = logits[top[3]].item()  # a run of ties well inside the top 25
        probs = logits.softmax(dim=0)
        expected_values, expected_ids = probs.sort(descending=True, stable=True)
        values, ids = stable_top_k(probs, 25)
        assert torch.equal(ids, expected_ids[:25])
        assert torch.equal(values, expected_values[:25])


def test_rows_sampled_together_match_each_stream_alone() -> None:
    """Three streams with their own seeds and score streams, sampled as rows of one batch step after step:
    the same tokens, candidate counts and fallbacks (fallbacks do fire) as each sampling alone."""
    seeds = [0, 1234, 2024]

    def samplers() -> list[RasSampler]:
        return [RasSampler(TOP_P, TOP_K, WIN_SIZE, TAU_R, generator=torch.Generator().manual_seed(s)) for s in seeds]

    data = [torch.Generator().manual_seed(s + 1) for s in seeds]
    favourites = [torch.randint(0, EOS, (4,), generator=g) for g in data]
    steps = [[step_scores(step, g, f) for step in range(60)] for g, f in zip(data, favourites)]
    alone = [[(r.token_id, r.num_candidates, r.fallback) for r in map(sampler, scores)]
             for sampler, scores in zip(samplers(), steps)]
    together_samplers = samplers()
    together: list[list[tuple[int, int, bool]]] = [[] for _ in seeds]
    for step in range(60):
        results = sample_rows(together_samplers, torch.stack([scores[step] for scores in steps]))
        for per_stream, r in zip(together, results):
            per_stream.append((r.token_id, r.num_candidates, r.fallback))
    assert together == alone
    assert all(any(fallback for *_, fallback in per_stream) for per_stream in alone)
