"""Random inputs and helpers shared by the streaming-flow tests (test_flow_*.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow
from cosyapp.engine.registry import make_tiny

CHUNK_TOKENS = 25
LOOKAHEAD = 3


def random_prompt(flow: CosyVoice2Flow, prompt_tokens: int,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prompt_token [1, P], prompt_feat [1, 2P, 80], embedding [1, 192] for the flow's config."""
    generator = torch.Generator().manual_seed(seed)
    cfg = flow.config
    return (torch.randint(0, cfg.vocab_size, (1, prompt_tokens), generator=generator),
            torch.randn(1, cfg.token_mel_ratio * prompt_tokens, cfg.output_size, generator=generator),
            torch.randn(1, cfg.spk_embed_dim, generator=generator))


def random_tokens(flow: CosyVoice2Flow, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, flow.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def hop_schedule(prompt_tokens: int, n_tokens: int, hop: int) -> list[int]:
    """Token counts after each non-final call: hops of `hop`, the first padded onto the chunk grid."""
    ends, offset = [], 0
    first = hop + (-prompt_tokens % CHUNK_TOKENS)
    while offset + (first if not ends else hop) + LOOKAHEAD <= n_tokens:
        offset += first if not ends else hop
        ends.append(offset)
    return ends


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def benchmark_model_dir(argv: list[str]) -> Path:
    """The model a test file's benchmark (run as a script) times: MODEL_DIR (argv[1]) if given, else a random
    tiny CosyVoice2 model written to a temporary folder."""
    if len(argv) > 1:
        return Path(argv[1])
    out = Path(tempfile.mkdtemp(prefix="cosyapp_tiny_"))
    make_tiny("cosyvoice2", out)
    return out
