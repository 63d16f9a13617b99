"""The fixed-shape batched decode step (decode_graphs.py): eagerly on the CPU against the plain step, and
replayed from CUDA graphs where a GPU is present."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cosyapp.backends.cosyvoice2.decode_graphs import StaticDecodeStep
from cosyapp.backends.cosyvoice2.decoding import Decoding, generate, stop_rule
from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM
from cosyapp.backends.cosyvoice2.runner import CosyVoiceRunner, CosyVoiceStream
from cosyapp.backends.cosyvoice2.sampling import RasSampler
from cosyapp.engine.types import SynthesisRequest

ROWS = 4
CONTEXT = 256
LOGP_ATOL = 1e-5


def load_lm(model_dir: Path, device: str) -> CosyVoice2LM:
    lm = CosyVoice2LM.from_pretrained(model_dir, device=device)
    lm.setup_cache(ROWS, CONTEXT)
    return lm


def prompts(lm: CosyVoice2LM, lengths: list[int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = lm.config.llm_input_size
    return [torch.randn(1, n, hidden, generator=generator).to(lm.device) for n in lengths]


def decode_inputs(lm: CosyVoice2LM, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One new token embedding per row, each row at its own position."""
    ids = torch.arange(len(lengths), device=lm.device) * 7 + 3
    x = lm.speech_embedding(ids).unsqueeze(1)
    return x, torch.tensor(lengths, device=lm.device).view(-1, 1)


@torch.inference_mode()
def test_fixed_shape_step_matches_the_eager_step(tiny_cosyvoice2_dir: Path) -> None:
    """Three rows prefilled with prompts of different lengths, decoded together: padded to the fixed size 4
    and attending over the whole cache, the step gives the eager step's log-probs, and the padding row's
    dummy write does not disturb the real rows."""
    lm = load_lm(tiny_cosyvoice2_dir, "cpu")
    lengths = [5, 17, 11]
    for row, prompt in enumerate(prompts(lm, lengths)):
        lm.step_logp(prompt, 0, row)
    x, positions = decode_inputs(lm, lengths)
    expected = lm.speech_logp(lm(x, positions, 0, max(lengths) + 1)[:, -1])

    step = StaticDecodeStep(lm, batch_sizes=(1, 2, 4), capture=False)
    assert step.sizes == [1, 2, 4] and step.size_for(3) == 4 and step.size_for(5) is None
    padded_x = torch.cat([x, torch.zeros_like(x[:1])])
    padded_pos = torch.cat([positions, torch.zeros_like(positions[:1])])
    logp = step(padded_x, padded_pos)
    assert logp.shape == (4, expected.shape[-1])
    torch.testing.assert_close(logp[:3], expected, atol=LOGP_ATOL, rtol=0)
    with pytest.raises(ValueError, match="not one of the fixed sizes"):
        step(x, positions)


class TokenLog:
    """Stands in for a stream's token2wav session: keeps the tokens the runner hands on."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def add(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)


@torch.inference_mode()
def test_runner_with_a_fixed_shape_step_samples_the_same_tokens(tiny_cosyvoice2_dir: Path) -> None:
    lm = load_lm(tiny_cosyvoice2_dir, "cpu")
    (prompt,) = prompts(lm, [9])

    alone = list(generate(lm, prompt, 0, 40, generator=torch.Generator().manual_seed(3), fixed_length=40,
                          cache_row=1))
    static_step = StaticDecodeStep(lm, capture=False)
    fixed_batches: list[int] = []
    fixed_step = static_step._step
    static_step._step = lambda x, pos: fixed_batches.append(x.shape[0]) or fixed_step(x, pos)
    runner = CosyVoiceRunner(SimpleNamespace(llm=lm), ROWS, static_step)
    generator = torch.Generator().manual_seed(3)
    state = CosyVoiceStream(SynthesisRequest(text="", voice=None), None, [[0]], None, generator, row=1,
                            lm=Decoding(1, prompt.shape[1], stop_rule(lm, 0, 40, fixed_length=40),
                                        RasSampler.from_config(lm.config, generator)),
                            lm_input=prompt, session=TokenLog())
    runner.prefill_rows([state])
    while state.decoding:
        runner.decode([state])
    batched = state.session.tokens
    assert batched == alone
    # Row 1 decoding alone runs as rows 0..1 (the fixed size 2); the prefill runs eagerly.
    assert fixed_batches == [2] * 39


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU; this machine has none")
@torch.inference_mode()
def test_cuda_graph_replay_matches_the_eager_step(tiny_cosyvoice2_dir: Path) -> None:
    lm = load_lm(tiny_cosyvoice2_dir, "cuda")
    step = StaticDecodeStep(lm, batch_sizes=(2,))  # captured now, before any row is in use
    assert step.sizes == [2, ROWS]
    lengths = [5, 17]
    for row, prompt in enumerate(prompts(lm, lengths)):
        lm.step_logp(prompt, 0, row)
    for offset in range(3):
        x, positions = decode_inputs(lm, [n + offset for n in lengths])
        expected = lm.speech_logp(lm(x, positions, 0, max(lengths) + offset + 1)[:, -1])
        torch.testing.assert_close(step(x, positions), expected, atol=1e-4, rtol=0)
    lm.setup_cache(ROWS, 2 * CONTEXT)  # a reallocated cache: the graph is captured again on first use
    for row, prompt in enumerate(prompts(lm, lengths)):
        lm.step_logp(prompt, 0, row)
    x, positions = decode_inputs(lm, lengths)
    expected = lm.speech_logp(lm(x, positions, 0, max(lengths) + 1)[:, -1])
    torch.testing.assert_close(step(x, positions), expected, atol=1e-4, rtol=0)
