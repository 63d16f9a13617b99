"""Upstream CosyVoice2's repetition-aware sampling (RAS), on the device, with upstream's exact RNG stream.

Upstream (`ras_sampling`) per step, on log-probs `scores` [V]:
1. nucleus: `p = softmax(scores)`, stable descending sort, keep candidates while the cumulative prob
   *before* adding is < top_p and fewer than top_k are kept; `torch.multinomial(kept_probs, 1,
   replacement=True)` on the un-renormalised kept probs;
2. if that pick occurs >= win_size * tau_r times among the last win_size decoded tokens, set its score to
   -inf and draw `softmax(scores).multinomial(1, replacement=True)` over the full vocabulary.

How we reproduce its random numbers without a host sync per draw: for one sample, torch.multinomial is an
exponential race, `argmax(p / q)` with `q = empty_like(p).exponential_()`, and the generator hands out one
Exp(1) value per element, in order. The number of values a step consumes (k candidates, plus V on a
fallback) is data dependent, so instead of asking the device for k before drawing, we draw Exp(1) values
ahead of time into a pool and consume it with an offset: the values each race sees are exactly the ones
upstream's multinomial calls would have drawn. The step's single host sync returns the token together
with k and the fallback flag, which advances the offset. (tests/unit/test_cosyvoice2_sampling.py checks
the equivalence against a literal re-statement of upstream's loop.)

Upstream sorts the whole vocabulary (stable, descending) and keeps the first top_k; we take the top_k
with `topk` and sort only those stably (equal probabilities: lower id first), the same list at a tenth of
the cost on a CPU, where the full sort was 40 % of a decode step.

Known deviations: upstream sums the candidate probs in a Python loop in float32; torch.cumsum may
accumulate in higher precision, so a partial sum within a few float32 ulps of top_p could end the
candidate list one token earlier or later. And when the top_k-th probability is exactly equal to one
outside the top_k, the full stable sort keeps the lower id, `topk` either one. We accept both (each has
probability ~1e-6 per step, the second only with exactly equal float32 probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from cosyapp.backends.cosyvoice2.config import LLMConfig


@dataclass
class SampleResult:
    """One sampling step. Host values came with the step's single sync; tensors stay on the device."""

    token_id: int
    num_candidates: int
    fallback: bool
    token: torch.Tensor  # [1] long, the sampled id (feed it back without a host round trip)
    nucleus_pick: torch.Tensor  # [] long, the first draw of the step
    sorted_ids: torch.Tensor  # [top_k] long, ids by descending prob; the first num_candidates are the nucleus
    sorted_probs: torch.Tensor  # [top_k] float32, their (un-renormalised) probabilities


class RasSampler:
    """Stateful RAS sampler for ONE stream: the recent-token window and the pre-drawn Exp(1) pool.

    `generator=None` uses the default generator of the scores' device (upstream behaviour: with
    `torch.manual_seed(s)` right before the first step, CPU sampling reproduces upstream token for
    token). A generator may live on another device than the scores (e.g. a seeded CPU generator for a
    CUDA model): its draws are copied over. The pool is drawn ahead of use, so other users of the same
    generator see a different stream than they would upstream; give each stream its own generator.
    """

    def __init__(self, top_p: float, top_k: int, win_size: int, tau_r: float,
                 generator: torch.Generator | None = None) -> None:
        self.top_p = top_p
        self.top_k = top_k
        self.win_size = win_size
        self.repeat_threshold = win_size * tau_r
        self.generator = generator
        self._window: torch.Tensor | None = None  # [win_size] last decoded ids (circular), -1 = empty
        self._num_decoded = 0
        self._pool: torch.Tensor | None = None
        self._offset = 0  # host copy of how much of the pool is consumed (known after each step's sync)

    @classmethod
    def from_config(cls, config: LLMConfig, generator: torch.Generator | None = None) -> "RasSampler":
        return cls(config.top_p, config.top_k, config.win_size, config.tau_r, generator)

    def _ensure_pool(self, need: int, device: torch.device) -> None:
        """Keep at least `need` unconsumed Exp(1) values (a step's worst case: top_k + V)."""
        available = 0 if self._pool is None else self._pool.numel() - self._offset
        if available >= need:
            return
        draw_device = self.generator.device if self.generator is not None else device
        # Several steps' worth at once: a nucleus draw uses <= top_k values, a fallback V more.
        fresh = torch.empty(4 * need, dtype=torch.float32, device=draw_device).exponential_(generator=self.generator)
        fresh = fresh.to(device)
        self._pool = fresh if self._pool is None else torch.cat([self._pool[self._offset:], fresh])
        self._offset = 0

    def __call__(self, scores: torch.Tensor) -> SampleResult:
        """Sample one id from log-probs `scores` [V] (already masked, e.g. EOS = -inf before min_len)."""
        return sample_rows([self], scores.unsqueeze(0))[0]


def sample_rows(samplers: Sequence[RasSampler], scores: torch.Tensor) -> list[SampleResult]:
    """One RAS step for several streams at once: row i of log-probs `scores` [B, V] is sampled with
    `samplers[i]` (all with the same settings), each consuming its own window and Exp(1) pool exactly as if
    it sampled alone. One host sync for all rows."""
    first = samplers[0]
    scores = scores.float()
    vocab = scores.size(1)
    top_k = min(first.top_k, vocab)
    device = scores.device
    for sampler in samplers:
        if sampler._window is None:
            sampler._window = torch.full((sampler.win_size,), -1, dtype=torch.long, device=device)
        sampler._ensure_pool(top_k + vocab, device)
    # Row i: the Exp(1) values sampler i has not consumed yet, as many as a step may use.
    noise = torch.stack([s._pool[s._offset:s._offset + top_k + vocab] for s in samplers])

    # Nucleus: candidates are a prefix of the stable sort (the cumulative sum only grows).
    sorted_probs, sorted_ids = stable_top_k(scores.softmax(dim=-1), top_k)
    cum_before = F.pad(sorted_probs.cumsum(-1)[:, :-1], (1, 0))
    keep = cum_before < first.top_p
    num_candidates = keep.sum(-1)
    race = sorted_probs / noise[:, :top_k]
    nucleus_pick = sorted_ids.gather(1, torch.where(keep, race, -1.0).argmax(-1, keepdim=True)).squeeze(1)

    # RAS fallback, computed every step (cheap) and used only when the pick repeats; its race reads each
    # row's pool right after the values its nucleus race consumed.
    windows = torch.stack([s._window for s in samplers])
    fallback = (windows == nucleus_pick.unsqueeze(1)).sum(-1) >= first.repeat_threshold
    fallback_probs = scores.scatter(1, nucleus_pick.unsqueeze(1), float("-inf")).softmax(dim=-1)
    fallback_noise = noise.gather(1, num_candidates.unsqueeze(1) + torch.arange(vocab, device=device))
    fallback_pick = (fallback_probs / fallback_noise).argmax(-1)
    tokens = torch.where(fallback, fallback_pick, nucleus_pick)

    token_ids, ks, fell_back = torch.stack([tokens, num_candidates, fallback.long()]).tolist()  # the one sync
    results = []
    for row, sampler in enumerate(samplers):
        sampler._offset += ks[row] + fell_back[row] * vocab
        sampler._window[sampler._num_decoded % sampler.win_size] = tokens[row]
        sampler._num_decoded += 1
        results.append(SampleResult(token_ids[row], ks[row], bool(fell_back[row]), tokens[row:row + 1],
                                    nucleus_pick[row], sorted_ids[row], sorted_probs[row]))
    return results


def stable_top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k (values, ids) along the last dim of `probs.sort(descending=True, stable=True)`, without
    sorting all of them (see the module docstring for the one case where the two can differ)."""
    values, ids = probs.topk(k, dim=-1)
    by_id = ids.argsort(dim=-1)
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    order = values.sort(dim=-1, descending=True, stable=True).indices
    return values.gather(-1, order), ids.gather(-1, order)
