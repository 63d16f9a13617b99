"""int8 weights for the LM's transformer on the CPU (`lm_weights` of the [cosyvoice2] and [cosyvoice3] sections).

A CPU decode step of the 0.5B LM reads all the weights of its 24 layers (358 M, 1.4 GB in float32) to do a few
rows of arithmetic: memory bandwidth sets its time, so weights stored in a quarter of the bytes make the step
several times faster (numbers at INT8_LM_WEIGHTS).

What becomes int8: every nn.Linear of the decoder layers (the q/k/v/o projections and the MLP). Its weight rows
get one scale each (symmetric, max |w| of the row / 127.5, as torch's `per_channel_dynamic_qconfig`: one large
row does not coarsen the others); the activations are quantized on every call (dynamic quantization) and the
products summed in integers by torch's CPU kernel (`quantized::linear_dynamic`, fbgemm/oneDNN). What stays in the
compute dtype: the embeddings, the norms, the KV cache and the speech-token head, whose log-probs the sampler
reads.

One departure from `torch.ao.quantization.quantize_dynamic` (whose kernel this is): that quantizes a call's
activations on one grid, from the min and max of the whole input, so a row's result would depend on the other
rows of its batch (up to 0.2 in the full-size model's log-probs, beside a row of larger activations) and a
stream would not get the tokens it gets alone. Here every row is scaled to a peak of 1 first and
a guard row holding +1 and -1 is added, so the kernel's grid is [-1, 1] whatever the batch: each row is
quantized on its own scale, decoding rows together or a prompt in one prefill changes only float rounding, as
in float. It costs about 15 % of the full-size int8 step (the extra elementwise work of every call). And torch's
quantization API is deprecated (a DeprecationWarning per call), which calling the kernels directly avoids.
"""

from __future__ import annotations

import torch
from torch import nn

from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM, Qwen2
from cosyapp.config import LM_WEIGHTS

# Weights in the decoder layers' linears from which int8 pays on a CPU (lm_weights = "auto"). Measured on a 2-core
# CPU (AMD EPYC, 2 threads), random Qwen2 stacks, the two kinds taking turns: ms per decode step at 1 and 8 rows
# and per 150-position prefill, float32 -> int8:
#   0.07 M (the tiny test models)  0.60 / 0.84 / 1.33 -> 1.32 / 1.55 / 2.14  (0.5-0.6x)
#   0.98 M                         1.35 / 2.32 / 4.93 -> 2.62 / 3.51 / 5.79  (0.5-0.9x)
#   3.9 M                          3.29 / 5.02 / 11.9 -> 3.44 / 5.05 / 8.93  (1.0-1.3x)
#   7.9 M                          6.21 / 9.06 / 23.0 -> 6.29 / 8.73 / 16.5  (1.0-1.4x)
#   16.5 M                         8.57 / 12.2 / 38.4 -> 5.75 / 8.30 / 19.5  (1.5-2.0x)
#   30.4 M                         13.6 / 19.1 / 69.2 -> 7.83 / 11.2 / 31.7  (1.7-2.2x)
#   358 M (the 0.5B LMs)           103 / 188 / 951 -> 30 / 52 / 254  (3.5-3.7x; prefill: 171 positions)
#                        another run  102 / 159 / 951 -> 30 / 44 / 352  (2.7-3.6x)
# Small float32 layers are read from the CPU's caches, and there the extra work of each int8 call (quantizing
# its activations row by row) is not paid back; from here int8 is 1.5x faster or more in every shape.
INT8_LM_WEIGHTS = 16_000_000
# fbgemm sums pairs of uint8 x int8 products in int16, which can saturate: activations get 7 bits, as in torch's
# own dynamic Linear.
REDUCE_RANGE = True
EPS = torch.finfo(torch.float32).eps  # the smallest scale (weights) and peak (activations: all-zero rows)


class Int8Linear(nn.Module):
    """An nn.Linear with int8 weights (one scale per output row) and activations quantized per call, row by row."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        # torch's symmetric qint8 weight observer: scale max |w| / ((127 - -128) / 2), at least EPS.
        scales = (weight.abs().amax(dim=1) / 127.5).clamp(min=EPS).double()
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        # Packed for the CPU kernel: an opaque object, not a parameter or buffer (`.to()` leaves it where it is).
        # No bias inside: the kernel's output is scaled back per row before the bias is added.
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        guard = torch.zeros(1, self.in_features)
        guard[0, :2] = torch.tensor([1.0, -1.0])
        self._guard = guard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel takes and returns float32 (a no-op in the CPU's default float32 compute).
        rows = x.reshape(-1, self.in_features).float()
        # Zero rows (prefill padding) get peak EPS: 0 / 0 would put NaN into keys and values that attention reads.
        peak = rows.abs().amax(dim=1, keepdim=True).clamp(min=EPS)
        out = torch.ops.quantized.linear_dynamic(torch.cat([rows / peak, self._guard]), self._packed, REDUCE_RANGE)
        out = out[:-1].mul_(peak)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def decoder_linear_weights(qwen: Qwen2) -> int:
    """Weights in the nn.Linear layers of the decoder layers: what int8 would store."""
    return sum(module.weight.numel() for module in qwen.layers.modules() if isinstance(module, nn.Linear))


def resolve_lm_weights(option: str, device: str | torch.device, weights: int,
                       threshold: int = INT8_LM_WEIGHTS) -> str:
    """"float" or "int8" for the `lm_weights` option of an LM with `weights` decoder-linear weights on `device`.

    int8 runs on the CPU only (its kernels are CPU kernels); "auto" picks it there from `threshold` weights up.
    """
    if option not in LM_WEIGHTS:
        raise ValueError(f"lm_weights must be one of {', '.join(LM_WEIGHTS)}; got {option!r}")
    device = torch.device(device)
    if option == "int8" and device.type != "cpu":
        raise ValueError(f'lm_weights = "int8" runs on the CPU only, but the LM is on {device}; '
                         'use "auto" or "float"')
    if option == "auto":
        return "int8" if device.type == "cpu" and weights >= threshold else "float"
    return option


def quantize_decoder_int8(qwen: Qwen2) -> None:
    """Replace every nn.Linear of the decoder layers by an Int8Linear, in place (the float weights are freed)."""
    for layer in qwen.layers:
        for block in (layer.self_attn, layer.mlp):
            for name, child in list(block.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(block, name, Int8Linear(child))


def use_lm_weights(llm: CosyVoice2LM, option: str) -> str:
    """Resolve `option` for the LM's size and device and quantize when that is int8 -> the weights the LM's
    layers run on, as the backend reports them: "int8" or the compute dtype ("float32", "bfloat16", ...)."""
    choice = resolve_lm_weights(option, llm.device, decoder_linear_weights(llm.qwen))
    if choice == "int8":
        quantize_decoder_int8(llm.qwen)
        return "int8"
    return str(llm.qwen.norm.weight.dtype).removeprefix("torch.")
