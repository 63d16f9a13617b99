"""The S1 prompt grid.

Layout (S1 `generate_long`): `<|interleave|>`, then per reference `<|speaker:0|>` + transcript + codes +
`<|im_end|>`, then `<|speaker:0|>` + target text. Each text part is tokenised on its own, so BPE never merges
across part boundaries. There is no chat template, no role and no text normalisation; the model continues
directly with semantic frames.

Grid `[num_codebooks + 1, T]`: row 0 holds token ids (for a code frame: semantic_begin_id + codebook-0 code),
rows 1.. hold the codes of code frames and 0 elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cosyapp.backends.fish.tokenizer import IM_END, INTERLEAVE, FishTokenizer

SPEAKER_TAG = "<|speaker:0|>"  # plain BPE text in S1, not a special token


@dataclass
class Reference:
    """One reference recording: its codec codes `[num_codebooks, T]` (int64) and its transcript."""

    codes: torch.Tensor
    text: str


def prompt_parts(text: str, references: list[Reference]) -> list[str | torch.Tensor]:
    """The prompt as upstream's part list: strings are tokenised separately, tensors are code blocks."""
    parts: list[str | torch.Tensor] = [INTERLEAVE]
    for ref in references:
        parts += [SPEAKER_TAG, ref.text, ref.codes, IM_END]
    parts += [SPEAKER_TAG, text]
    return parts


def build_prompt(tokenizer: FishTokenizer, text: str, references: list[Reference], num_codebooks: int) -> torch.Tensor:
    """Assemble the int64 prompt grid `[num_codebooks + 1, T]` (on CPU)."""
    columns: list[torch.Tensor] = []
    for part in prompt_parts(text, references):
        if isinstance(part, str):
            ids = torch.tensor(tokenizer.encode(part), dtype=torch.long)
            block = torch.zeros(num_codebooks + 1, len(ids), dtype=torch.long)
            block[0] = ids
        else:
            codes = part.to("cpu", torch.long)
            if codes.dim() != 2 or codes.shape[0] != num_codebooks:
                raise ValueError(f"reference codes must be [{num_codebooks}, T], got {tuple(codes.shape)}")
            block = torch.cat([codes[:1] + tokenizer.semantic_begin_id, codes])
        columns.append(block)
    return torch.cat(columns, dim=1)
