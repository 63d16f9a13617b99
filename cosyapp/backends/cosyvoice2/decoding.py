"""How the CosyVoice2 LM decodes (upstream's loop): stop rules, banned ids, per-stream decoding state, and the
reference loop for one stream alone. The model (llm.py) only computes log-probs; the runner (runner.py) uses
these to decode many streams in one forward per step, each exactly as `generate` would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM
from cosyapp.backends.cosyvoice2.sampling import RasSampler, SampleResult, sample_rows


@dataclass(frozen=True)
class StopRule:
    """When upstream's decoding stops: at a stop id (>= `eos`, the speech vocabulary size), which is banned
    while fewer than `min_len` tokens were made, or after `num_steps` (max_len) tokens. `fixed` (benchmarks)
    bans every stop id, so exactly num_steps tokens come out whatever the weights."""
    eos: int
    min_len: int
    num_steps: int
    fixed: bool = False

    def banned(self, made: int) -> tuple[int, int | None] | None:
        """Ids [start, stop) masked in the step after `made` tokens (stop None: to the end)."""
        if self.fixed:
            return (self.eos, None)  # every stop id
        if made < self.min_len:
            return (self.eos, self.eos + 1)
        return None

    def is_stop(self, token_id: int) -> bool:
        return not self.fixed and token_id >= self.eos


def stop_rule(llm: CosyVoice2LM, min_len: int, max_len: int, fixed_length: int | None = None) -> StopRule:
    """Upstream's stop conditions for a sentence (`length_limits`), or exactly `fixed_length` tokens."""
    return StopRule(llm.config.speech_token_size, min_len, max_len if fixed_length is None else fixed_length,
                    fixed_length is not None)


def ban(logp: torch.Tensor, banned: tuple[int, int | None] | None) -> torch.Tensor:
    """Log-probs with ids [start, stop) set to -inf (stop None: to the end), in place."""
    if banned is not None:
        logp[..., banned[0]:banned[1]] = float("-inf")
    return logp


@dataclass(eq=False)
class Decoding:
    """One sentence's decoding in one KV-cache row."""
    row: int
    prompt_len: int  # L: the first sampled token is fed back at position L
    rule: StopRule
    sampler: RasSampler
    produced: int = 0
    token: torch.Tensor | None = None  # [1] the last sampled id, on the device (the next step's input)
    ended: bool = False
    tokens: list[int] = field(default_factory=list)  # made and not yet handed on

    @property
    def next_position(self) -> int:
        """Where the last sampled token is fed back."""
        return self.prompt_len + self.produced - 1


def accept(decodings: Sequence[Decoding], logp: torch.Tensor) -> None:
    """Sample one token for each decoding from its row of log-probs [B, V] (its banned ids masked; one host sync
    for all rows) and apply its stop rule: a stop id or the last allowed step ends it."""
    scores = torch.stack([ban(row_logp, d.rule.banned(d.produced)) for row_logp, d in zip(logp, decodings)])
    for decoding, sample in zip(decodings, sample_rows([d.sampler for d in decodings], scores)):
        if decoding.rule.is_stop(sample.token_id):
            decoding.ended = True
            continue
        decoding.produced += 1
        decoding.token = sample.token
        decoding.tokens.append(sample.token_id)
        if decoding.produced == decoding.rule.num_steps:
            decoding.ended = True


def sample_step(llm: CosyVoice2LM, x: torch.Tensor, position: int, cache_row: int, sampler: RasSampler,
                banned: tuple[int, int | None] | None) -> SampleResult:
    """One row alone (`step_logp`), its banned ids masked, then sampled."""
    return sampler(ban(llm.step_logp(x, position, cache_row), banned))


@torch.inference_mode()
def generate(llm: CosyVoice2LM, lm_input: torch.Tensor, min_len: int, max_len: int,
             generator: torch.Generator | None = None, fixed_length: int | None = None,
             cache_row: int = 0) -> Iterator[int]:
    """Upstream's decoding loop for one stream: yield speech token ids until a stop id or max_len (see
    `StopRule`). Uses cache row `cache_row`; one generation per row at a time. The one host sync per step is the
    sampled id. (The engine decodes its streams together: runner.py.)"""
    rule = stop_rule(llm, min_len, max_len, fixed_length)
    length = lm_input.shape[1]
    llm.ensure_cache(length + rule.num_steps)
    sampler = RasSampler.from_config(llm.config, generator)
    x, position = lm_input, 0
    for i in range(rule.num_steps):
        sample = sample_step(llm, x, position, cache_row, sampler, rule.banned(i))
        if rule.is_stop(sample.token_id):
            return
        yield sample.token_id
        x, position = llm.speech_embedding(sample.token).reshape(1, 1, -1), length + i
