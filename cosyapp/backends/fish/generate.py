"""S1 sampling and the frame-by-frame generation loop.

Sampler: S1 `logits_to_probs` semantics (see `sampling`), one 1-D logit vector at a time.

RNG: per frame one Exp(1) draw over the whole vocabulary (main token, any id may win), then 9 draws over the
first `fast_width` (1024) fast logits (codebooks 1..9). Drawn from a per-request `torch.Generator`, which on
CPU yields the same stream as upstream's `torch.manual_seed` + global generator.

Repetition-penalty windows (S1 quirk, kept by default): a zero-initialised history `B[11, *]` receives frame i
(i >= 1; the prefill frame 0 never enters) in column i-1; decode iteration j (producing frame j+1) uses the
16-column window W = B[:, max(0, j-16) : max(0, j-16) + 16]. The main token is penalised with W[:, 0] (the 11
values of ONE frame; upstream's slicing quirk) and codebook k with W[k+1]. `penalty_main_history=True` uses
W[0] (the main-token history) instead, the pre-quirk behaviour.

Stop: after a decode step whose main token is `<|im_end|>` (the prefill frame is not checked). Budget:
`max_new_tokens` frames including the prefill frame, reduced to fit `max_seq_len`, 0 = up to `max_seq_len`.
The caller drops the last generated frame (S1 `generate_long` does, also when the budget ended generation).
"""

from __future__ import annotations

import threading
from typing import Iterator

import torch
from torch import Tensor

from cosyapp.backends.fish.dual_ar import DualARTransformer
from cosyapp.backends.fish.sampling import SamplingParams, draw, nucleus_probs, penalize, sampler_settings

PENALTY_WINDOW = 16
PROMPT_RESERVE = 2048  # S1 rejects prompts longer than max_seq_len - 2048


class Sampler:
    """One stream's S1 sampler (the batched functions of `sampling` on one row), settings on the model's
    device."""

    def __init__(self, params: SamplingParams, device: torch.device | str, generator: torch.Generator) -> None:
        self.settings = sampler_settings(params, device)
        self.temperature, self.top_p, self.repetition_penalty = self.settings.unbind()
        self.generator = generator

    def penalize(self, logits: Tensor, penalty_ids: Tensor) -> Tensor:
        return penalize(logits[None], penalty_ids[None], self.repetition_penalty)[0]

    def probs(self, logits: Tensor, penalty_ids: Tensor | None) -> Tensor:
        """`logits [V]` -> sampling distribution `[V]` (float32; exactly 0 outside the nucleus)."""
        return nucleus_probs(logits[None], self.settings[None],
                             None if penalty_ids is None else penalty_ids[None])[0]

    def draw(self, probs: Tensor) -> Tensor:
        """argmax(p / q), q ~ Exp(1) from the request's generator; returns a 0-d int64 tensor (no host sync)."""
        return draw(probs[None], [self.generator])[0]

    def sample(self, logits: Tensor, penalty_ids: Tensor | None) -> Tensor:
        return self.draw(self.probs(logits, penalty_ids))


def penalty_window(frames: Tensor, j: int) -> Tensor:
    """S1's 16-frame repetition-penalty window `[11, 16]` for decode iteration j (producing frame j+1).

    `frames` holds the prefill frame in column 0 and frame i >= 1 in column i, i.e. columns 1.. are S1's
    zero-initialised history buffer; early windows therefore include not-yet-written zero columns."""
    start = 1 + max(0, j - PENALTY_WINDOW)
    return frames[:, start:start + PENALTY_WINDOW]


def request_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A per-request generator; `seed` as S1 `set_seed` takes it (absolute value, capped at 2**31)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(min(abs(int(seed)), 2**31))
    return generator


def frame_budget(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
    """Frames S1 may generate (prefill frame included): `max_new_tokens`, reduced to fit the context."""
    if prompt_len > max_seq_len - PROMPT_RESERVE:
        raise ValueError(f"prompt of {prompt_len} tokens is longer than {max_seq_len - PROMPT_RESERVE} "
                         f"(max_seq_len - {PROMPT_RESERVE})")
    room = max_seq_len - prompt_len
    return room if max_new_tokens == 0 else min(max_new_tokens, room)


class FrameGenerator:
    """Generates S1 frames `[num_codebooks + 1]` (main token id, code0..code9) for one prompt."""

    def __init__(self, model: DualARTransformer, params: SamplingParams, generator: torch.Generator,
                 fast_width: int = 1024, row: int = 0) -> None:
        self.model = model
        self.sampler = Sampler(params, model.output.weight.device, generator)
        self.penalty_main_history = params.penalty_main_history
        self.fast_width = fast_width  # S1 samples codebooks 1.. from the first 1024 fast logits only
        self.row = row  # the KV-cache row this stream owns

    def main_penalty_ids(self, window: Tensor) -> Tensor:
        """S1 penalises the main token with column 0 of the window (one frame's 11 values: a slicing quirk);
        the fix uses row 0, the main-token history."""
        return window[0] if self.penalty_main_history else window[:, 0]

    def sample_frame(self, logits: Tensor, hidden: Tensor, window: Tensor | None) -> Tensor:
        """Sample one frame from the slow outputs of the last position (batch 1). `window [11, 16]` holds the
        penalty history (None for the prefill frame, which is not penalised)."""
        model, sampler = self.model, self.sampler
        main = sampler.sample(logits[0], None if window is None else self.main_penalty_ids(window))
        # S1 clamps only below; the upper clamp keeps a sampled vocabulary-padding id from crashing the lookup.
        code = (main - model.semantic_begin_id).clamp(0, model.config.codebook_size - 1)
        codes = [code]
        model.fast_forward_cached(hidden, 0, self.row)  # position 0 only fills the cache; its logits are unused
        for k in range(1, model.config.num_codebooks):
            fast_logits = model.fast_forward_cached(model.fast_embeddings(code)[None], k, self.row)
            fast_logits = fast_logits[0, : self.fast_width]
            code = sampler.sample(fast_logits, None if window is None else window[k + 1])
            codes.append(code)
        return torch.stack([main, *codes])

    @torch.inference_mode()
    def frames(self, prompt: Tensor, budget: int, im_end_id: int | None, check_every: int = 4,
               cancel: threading.Event | None = None) -> Iterator[Tensor]:
        """Yield blocks of new frames `[11, n]` (on the model's device) until `<|im_end|>` or the budget.

        `im_end_id=None` ignores the stop token (fixed-length benchmarks). The stop token is looked for every
        `check_every` frames (one host sync per check); frames generated past it are discarded, so the result
        is the same as checking after every step.
        """
        model = self.model
        device = model.output.weight.device
        rows = model.config.num_codebooks + 1
        # Column 0 = prefill frame; columns 1.. = S1's history buffer B (zero padded to the window width).
        frames = torch.zeros(rows, 1 + max(budget, PENALTY_WINDOW), dtype=torch.long, device=device)
        logits, hidden = model.forward_cached(prompt.to(device)[None], 0, self.row)
        frames[:, 0] = self.sample_frame(logits, hidden, None)
        emitted = 0
        for j in range(budget - 1):
            if cancel is not None and cancel.is_set():
                return
            if j and j % check_every == 0:
                block, stopped = self._confirm(frames, emitted, j + 1, im_end_id)
                yield block
                emitted += block.shape[1]
                if stopped:
                    return
            logits, hidden = model.forward_cached(frames[:, j:j + 1][None], prompt.shape[-1] + j, self.row)
            frames[:, j + 1] = self.sample_frame(logits, hidden, penalty_window(frames, j))
        block, _ = self._confirm(frames, emitted, budget, im_end_id)
        yield block

    @staticmethod
    def _confirm(frames: Tensor, emitted: int, produced: int, im_end_id: int | None) -> tuple[Tensor, bool]:
        """Frames emitted..produced-1, cut after the first decode-step `<|im_end|>`; (block, stopped)."""
        if im_end_id is None:
            return frames[:, emitted:produced], False
        first = max(emitted, 1)  # the prefill frame (column 0) is never checked
        hits = (frames[0, first:produced] == im_end_id).nonzero()
        if hits.numel() == 0:
            return frames[:, emitted:produced], False
        stop = first + int(hits[0, 0]) + 1
        return frames[:, emitted:stop], True
