"""ONNX export of the CosyVoice2 flow estimator, the network the Euler solver calls 10 times per flow call.

The graph has the inputs of upstream's `flow.decoder.estimator.fp32.onnx` (x, mask, mu, t, spks, cond;
output estimator_out) but both batch and length are dynamic (upstream fixes batch at 2), so the CFG rows
of several streams can share one call.

The attention choice is baked into the graph, one file per choice: full attention (non-streaming calls,
upstream's final streaming call) and 50-frame chunk masks (streaming calls). An input carrying the mask
would be [B, T, T] (32 x 3000^2 values at the TensorRT profile's maximum), and a chunk-size input would
change the signature every runtime of the estimator expects; two graphs keep that signature and cost
nothing at run time, the runtime picks one by the `streaming` flag like the torch module.

Exported with the TorchScript-based exporter (`dynamo=False`): it needs the `onnx` package, not onnxscript.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from cosyapp.backends.cosyvoice2.estimator import CausalConditionalDecoder

ESTIMATOR_INPUTS = ("x", "mask", "mu", "t", "spks", "cond")
ESTIMATOR_OUTPUT = "estimator_out"
OPSET = 18  # LayerNormalization (17) and Mish (18) are single ops
PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16"}
EXPORT_FRAMES = 256  # example length: several chunks, so nothing specialises to one chunk


class FixedAttentionEstimator(nn.Module):
    """The estimator with its attention choice fixed, so that forward takes exactly the exported inputs."""

    def __init__(self, estimator: CausalConditionalDecoder, streaming: bool) -> None:
        super().__init__()
        self.estimator = estimator
        self.streaming = streaming

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
        return self.estimator(x, mask, mu, t, spks, cond, self.streaming)


def onnx_path(model_dir: str | Path, streaming: bool, dtype: torch.dtype = torch.float32) -> Path:
    """`flow.decoder.estimator.{full|chunk}.{fp32|fp16}.onnx` in the model directory (the release's own
    `flow.decoder.estimator.fp32.onnx`, batch fixed at 2, is left alone)."""
    variant = "chunk" if streaming else "full"
    return Path(model_dir) / f"flow.decoder.estimator.{variant}.{PRECISIONS[dtype]}.onnx"


def random_inputs(estimator: CausalConditionalDecoder, batch: int, frames: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
                  padded_rows: int = 0) -> tuple[Tensor, ...]:
    """Random (x, mask, mu, t, spks, cond) in the ranges the solver feeds; the last `padded_rows` rows get
    a padding mask (their second half is padding)."""
    n_mels = estimator.final_proj.out_channels

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    mask = torch.ones(batch, 1, frames)
    if padded_rows:
        mask[batch - padded_rows:, :, frames // 2:] = 0
    t = torch.rand(batch, generator=generator).to(device=device, dtype=dtype)
    return (normal(batch, n_mels, frames), mask.to(device=device, dtype=dtype), normal(batch, n_mels, frames), t,
            normal(batch, n_mels), normal(batch, n_mels, frames))


def export_estimator(estimator: CausalConditionalDecoder, path: str | Path, streaming: bool,
                     opset: int = OPSET) -> Path:
    """Write the estimator (on its current device and dtype) as ONNX with dynamic batch and length."""
    path = Path(path)
    param = next(estimator.parameters())
    module = FixedAttentionEstimator(estimator, streaming).eval()
    example = random_inputs(estimator, 2, EXPORT_FRAMES, param.device, param.dtype, torch.Generator().manual_seed(0))
    per_frame = {0: "batch", 2: "frames"}
    dynamic_axes = {name: per_frame for name in ("x", "mask", "mu", "cond", ESTIMATOR_OUTPUT)}
    dynamic_axes.update(t={0: "batch"}, spks={0: "batch"})
    # Write next to the target and rename, so an interrupted export never leaves a truncated model behind.
    partial = path.with_name(path.name + f".{os.getpid()}.partial")
    try:
        with torch.no_grad():
            torch.onnx.export(module, example, str(partial), dynamo=False, input_names=list(ESTIMATOR_INPUTS),
                              output_names=[ESTIMATOR_OUTPUT], dynamic_axes=dynamic_axes, opset_version=opset,
                              do_constant_folding=True)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def export_estimators(estimator: CausalConditionalDecoder, model_dir: str | Path) -> dict[bool, Path]:
    """Both attention variants into `model_dir` (names from `onnx_path`): {streaming: path}."""
    dtype = next(estimator.parameters()).dtype
    return {streaming: export_estimator(estimator, onnx_path(model_dir, streaming, dtype), streaming)
            for streaming in (False, True)}
