"""The S1 sampler over a batch of streams, each with its own settings and its own generator.

Per row (S1 `logits_to_probs` semantics): repetition penalty -> top-p on the *untempered* logits (the entry
that crosses top_p is dropped, the first is always kept) -> / max(temperature, 1e-5) -> softmax ->
argmax(p / q) with q ~ Exp(1). No top-k. The settings are float32 so comparisons happen in float32 like
upstream. Every operation works along the last axis only, so a row's result does not depend on the other
rows; the Exp(1) noise of row b comes from generator b alone, so a stream draws the same numbers whoever
shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.8
    repetition_penalty: float = 1.1
    max_new_tokens: int = 1024
    penalty_main_history: bool = False  # False = S1 (window column 0), True = main-token history (window row 0)


def sampler_settings(params: SamplingParams, device: torch.device | str) -> Tensor:
    """One stream's settings as float32 `[3]`: temperature (at least 1e-5), top_p, repetition penalty. Stack
    the streams' settings into `[B, 3]` for a batched call."""
    values = [max(params.temperature, MIN_TEMPERATURE), params.top_p, params.repetition_penalty]
    return torch.tensor(values, dtype=torch.float32, device=device)


def penalize(logits: Tensor, penalty_ids: Tensor, repetition_penalty: Tensor) -> Tensor:
    """`logits [B, V]` at `penalty_ids [B, n]` multiplied by the row's penalty `[B, 1]` when negative, divided
    by it otherwise (an id listed twice is penalised once)."""
    score = logits.gather(1, penalty_ids)
    score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
    return logits.scatter(1, penalty_ids, score)


def nucleus_probs(logits: Tensor, settings: Tensor, penalty_ids: Tensor | None) -> Tensor:
    """`logits [B, V]`, `settings [B, 3]` -> sampling distributions `[B, V]` (float32; exactly 0 outside each
    row's nucleus). `penalty_ids [B, n]` or None (no repetition penalty)."""
    temperature, top_p, repetition_penalty = settings.float().split(1, dim=1)
    logits = logits.float()
    if penalty_ids is not None:
        logits = penalize(logits, penalty_ids, repetition_penalty)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative > top_p
    drop_sorted[:, 0] = False
    drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
    logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits / temperature, dim=-1)


def draw(probs: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """argmax(p / q) per row, q ~ Exp(1) drawn for row b from `generators[b]` (a row consumes the same numbers
    as a one-row call would); returns `[B]` int64 on the probabilities' device (no host sync)."""
    noise = torch.empty_like(probs)
    for row, generator in zip(noise, generators, strict=True):
        row.exponential_(1, generator=generator)
    return torch.argmax(probs / noise, dim=-1)


def sample(logits: Tensor, settings: Tensor, penalty_ids: Tensor | None,
           generators: Sequence[torch.Generator]) -> Tensor:
    """One id per row of `logits [B, V]`: `draw(nucleus_probs(...))`."""
    return draw(nucleus_probs(logits, settings, penalty_ids), generators)
