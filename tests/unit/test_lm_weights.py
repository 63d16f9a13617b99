"""int8 LM weights (backends/cosyvoice2/lm_weights.py): what is quantized, its error against float32, rows decoded
together against each row alone, and how `lm_weights` is resolved."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cosyapp.backends.cosyvoice2.backend import CosyVoice2Backend
from cosyapp.backends.cosyvoice2.decoding import Decoding, generate, stop_rule
from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM
from cosyapp.backends.cosyvoice2.lm_weights import (INT8_LM_WEIGHTS, Int8Linear, decoder_linear_weights,
                                                     resolve_lm_weights, use_lm_weights)
from cosyapp.backends.cosyvoice2.runner import CosyVoiceRunner, CosyVoiceStream
from cosyapp.backends.cosyvoice2.sampling import RasSampler
from cosyapp.engine.types import SynthesisRequest

# Half a quantization step, relative to the row's largest value: weights 1/255 (scale max |w| / 127.5),
# activations 1/127 (a row scaled to a peak of 1 on the kernel's 7-bit grid over [-1, 1]: step 2/127).
HALF_STEP_W = 1 / 255
HALF_STEP_X = 1 / 127


def int8_lm(model_dir: Path, rows: int = 2) -> CosyVoice2LM:
    lm = CosyVoice2LM.from_pretrained(model_dir)
    assert use_lm_weights(lm, "int8") == "int8"
    lm.setup_cache(rows, 256)
    return lm


@torch.inference_mode()
def test_an_int8_linear_errs_by_at_most_half_a_step_of_each_operand_row_by_row() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(4, 96)
    x[1] *= 50.0  # rows of very different sizes: each is quantized on its own scale
    x[2] = 0.0  # a padding row
    int8 = Int8Linear(linear)
    y, want = int8(x), linear(x)
    # |sum_k x_k w_k - sum_k x'_k w'_k| <= dw sum|x| + dx sum|w| + K dw dx, with dw, dx the half steps of the row.
    dw = HALF_STEP_W * linear.weight.abs().amax(dim=1)  # [out]
    dx = HALF_STEP_X * x.abs().amax(dim=1, keepdim=True)  # [rows, 1]
    bound = dw * x.abs().sum(1, keepdim=True) + dx * linear.weight.abs().sum(1) + 96 * dw * dx
    assert ((y - want).abs() <= bound + 1e-5).all()
    assert not torch.allclose(y, want, atol=1e-4, rtol=0)  # it is int8 arithmetic, not float's
    assert torch.equal(y[2], linear.bias)  # a zero row gives the bias, no NaN
    # A row's result does not depend on the other rows of the call (float rounding at most).
    for row in range(4):
        torch.testing.assert_close(int8(x[row:row + 1]), y[row:row + 1], atol=1e-5, rtol=1e-6)


def test_int8_quantizes_the_decoder_layers_only(tiny_cosyvoice2_dir: Path) -> None:
    lm = int8_lm(tiny_cosyvoice2_dir)
    layers = list(lm.qwen.layers.modules())
    assert not any(isinstance(module, nn.Linear) for module in layers)
    assert sum(isinstance(module, Int8Linear) for module in layers) == 7 * len(lm.qwen.layers)
    assert type(lm.llm_decoder) is nn.Linear and lm.llm_decoder.weight.dtype == torch.float32
    for table in (lm.speech_embedding, lm.qwen.embed_tokens, lm.llm_embedding):
        assert table.weight.dtype == torch.float32
    assert lm.qwen.norm.weight.dtype == torch.float32


@torch.inference_mode()
def test_int8_log_probs_stay_close_to_float32(tiny_cosyvoice2_dir: Path) -> None:
    """Bound from the quantization steps: one int8 product errs by at most about half a step of each operand,
    1/255 + 1/127 = 1.2 % of its scale. The tiny LM has 2 layers of two blocks, each two products in series
    (q/k/v then o; gate/up then down), 4 in a row: a hidden state moves by at most ~4 x 1.2 % = 4.7 % of its
    size (measured: 1.1 %). The head is float: a logit moves by at most |head row| |dh| (Cauchy-Schwarz), and a
    log-prob by at most twice the largest logit move (log_softmax subtracts a logsumexp that moves no more)."""
    reference = CosyVoice2LM.from_pretrained(tiny_cosyvoice2_dir)
    reference.setup_cache(1, 256)
    lm = int8_lm(tiny_cosyvoice2_dir, rows=1)
    x = torch.randn(1, 60, reference.config.llm_input_size, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(60)[None]
    hidden, want = lm(x, positions, 0, 60)[0], reference(x, positions, 0, 60)[0]
    relative = 2 * len(lm.qwen.layers) * 2 * (HALF_STEP_W + HALF_STEP_X)
    assert ((hidden - want).norm(dim=-1) <= relative * want.norm(dim=-1)).all()
    logit_move = relative * want.norm(dim=-1).max() * reference.llm_decoder.weight.norm(dim=-1).max()
    difference = (lm.speech_logp(hidden) - reference.speech_logp(want)).abs().max()
    assert 0 < difference <= 2 * logit_move


@torch.inference_mode()
def test_int8_rows_decoded_together_get_the_tokens_each_gets_alone(tiny_cosyvoice2_dir: Path) -> None:
    """Two streams prefilled in one forward (prompts of different lengths, the shorter padded) and decoded in one
    forward per step sample what each samples alone in its row."""
    lm = int8_lm(tiny_cosyvoice2_dir)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randn(1, n, lm.config.llm_input_size, generator=generator) for n in (9, 14)]
    steps, seeds = 40, (3, 4)
    alone = [list(generate(lm, prompt, 0, steps, generator=torch.Generator().manual_seed(seed),
                           fixed_length=steps, cache_row=row))
             for row, (prompt, seed) in enumerate(zip(prompts, seeds))]

    runner = CosyVoiceRunner(SimpleNamespace(llm=lm), 2)
    states = []
    for row, (prompt, seed) in enumerate(zip(prompts, seeds)):
        sampler_generator = torch.Generator().manual_seed(seed)
        states.append(CosyVoiceStream(
            SynthesisRequest(text="", voice=None), None, [[0]], None, sampler_generator, row=row,
            lm=Decoding(row, prompt.shape[1], stop_rule(lm, 0, steps, fixed_length=steps),
                        RasSampler.from_config(lm.config, sampler_generator)),
            lm_input=prompt, session=SimpleNamespace(add=lambda tokens: None)))
    runner.prefill_rows(states)
    while any(state.decoding for state in states):
        runner.decode([state for state in states if state.decoding])
    assert [state.tokens for state in states] == alone
    assert alone[0] != alone[1]


def test_auto_is_int8_on_a_cpu_from_the_threshold_up() -> None:
    assert resolve_lm_weights("auto", "cpu", INT8_LM_WEIGHTS - 1) == "float"
    assert resolve_lm_weights("auto", "cpu", INT8_LM_WEIGHTS) == "int8"
    assert resolve_lm_weights("auto", "cpu", 358_000_000) == "int8"  # the released 0.5B LMs
    assert resolve_lm_weights("auto", "cpu", 1000, threshold=500) == "int8"
    assert resolve_lm_weights("auto", "cuda", 358_000_000) == "float"
    assert resolve_lm_weights("auto", "cuda:1", 358_000_000) == "float"
    assert resolve_lm_weights("float", "cpu", 358_000_000) == "float"
    assert resolve_lm_weights("int8", "cpu", 10) == "int8"


def test_auto_keeps_the_tiny_models_in_float32(tiny_cosyvoice2_dir: Path) -> None:
    lm = CosyVoice2LM.from_pretrained(tiny_cosyvoice2_dir)
    assert decoder_linear_weights(lm.qwen) < INT8_LM_WEIGHTS
    assert use_lm_weights(lm, "auto") == "float32"
    assert any(isinstance(module, nn.Linear) for module in lm.qwen.layers.modules())


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_int8_on_a_gpu_is_an_error_naming_the_option(device: str | torch.device) -> None:
    with pytest.raises(ValueError, match='lm_weights = "int8" runs on the CPU only'):
        resolve_lm_weights("int8", device, 358_000_000)


def test_unknown_lm_weights_are_an_error() -> None:
    with pytest.raises(ValueError, match="lm_weights must be one of auto, float, int8; got 'bf16'"):
        resolve_lm_weights("bf16", "cpu", 10)


def test_the_backend_reports_its_lm_weights(tiny_cosyvoice2_dir: Path) -> None:
    options = dict(device="cpu", max_streams=1, lm_context=256)
    assert CosyVoice2Backend(tiny_cosyvoice2_dir, **options).info().lm_weights == "float32"
    backend = CosyVoice2Backend(tiny_cosyvoice2_dir, lm_weights="int8", **options)
    assert backend.info().lm_weights == "int8"
    assert isinstance(backend.llm.qwen.layers[0].mlp.down_proj, Int8Linear)
