"""TensorRT estimator (cosyapp/accel/trt.py): without TensorRT the module imports, says why it cannot be
used and leaves the flow alone; the runtime wrapper routes calls (tested with a stand-in engine); where
TensorRT and a GPU are present, engines are built, verified against torch and used by the flow."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from cosyapp.accel import trt as accel_trt
from cosyapp.accel.onnx_export import FixedAttentionEstimator
from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow
from cosyapp.backends.cosyvoice2.flow_stream import FlowStream

MEL_ATOL = 1e-4


@pytest.fixture(scope="module")
def flow(tiny_cosyvoice2_dir: Path) -> CosyVoice2Flow:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return CosyVoice2Flow.from_pretrained(tiny_cosyvoice2_dir)


def prompt(flow: CosyVoice2Flow, tokens: int = 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, 6561, (1, tokens), generator=generator),
            torch.randn(1, 2 * tokens, 80, generator=generator), torch.randn(1, 192, generator=generator))


def test_without_tensorrt_nothing_changes(flow: CosyVoice2Flow, tiny_cosyvoice2_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    reason = accel_trt.trt_unavailable_reason()
    assert reason is not None and "tensorrt" in reason
    estimator = flow.decoder.estimator
    assert accel_trt.load_trt_estimator(flow, tiny_cosyvoice2_dir) is None
    assert flow.decoder.estimator is estimator
    with pytest.raises(accel_trt.TrtError, match="tensorrt package is not installed"):
        accel_trt.build_trt(tiny_cosyvoice2_dir)


def test_plan_names_carry_gpu_and_version() -> None:
    assert accel_trt.gpu_tag("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert (accel_trt.plan_name(False, True, "NVIDIA H100 80GB HBM3", "10.13.3.9")
            == "flow.decoder.estimator.full.fp16.nvidia-h100-80gb-hbm3.trt10.13.3.9.plan")
    assert (accel_trt.plan_name(True, False, "NVIDIA L20", "10.0.1")
            == "flow.decoder.estimator.chunk.fp32.nvidia-l20.trt10.0.1.plan")


class StandInEngine:
    """Duck-typed TrtEngine: runs the torch estimator with the attention fixed, and counts calls."""

    def __init__(self, estimator, streaming: bool, max_frames: int) -> None:
        self.module = FixedAttentionEstimator(estimator, streaming)
        self.max_frames = max_frames
        self.calls = 0

    def supports(self, batch: int, frames: int) -> bool:
        return 2 <= batch <= 4 and 4 <= frames <= self.max_frames

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.module(*inputs)


def test_trt_estimator_routes_calls(flow: CosyVoice2Flow) -> None:
    """Uncached calls the engines cover go to them; cached (incremental) calls and uncovered shapes to torch.
    The stream's result is unchanged."""
    tokens = torch.randint(0, 6561, (83,), generator=torch.Generator().manual_seed(1))
    reference = FlowStream(flow, *prompt(flow)).advance(tokens, finalize=False)
    reference_final = flow.inference(tokens[None], *prompt(flow), streaming=False, finalize=True)[:, :, 2 * 80:]
    torch_estimator = flow.decoder.estimator
    engines = {False: StandInEngine(torch_estimator, False, 1000), True: StandInEngine(torch_estimator, True, 100)}
    try:
        wrapper = accel_trt.use_trt_estimator(flow, engines)
        assert flow.decoder.estimator is wrapper and wrapper.torch_estimator is torch_estimator
        assert accel_trt.use_trt_estimator(flow, engines).torch_estimator is torch_estimator  # no nesting
        stream = FlowStream(flow, *prompt(flow))
        mel = stream.advance(tokens[:83], finalize=False)  # cached: torch
        final = stream.advance([], finalize=True)  # exact final: 10 full-attention calls, 220 frames
        streamed = flow.inference(tokens[None, :40], *prompt(flow), streaming=True, finalize=False)  # 134 > 100
    finally:
        flow.decoder.estimator = torch_estimator
    assert engines[False].calls == 10 and engines[True].calls == 0
    assert float((mel - reference).abs().max()) <= MEL_ATOL
    assert float((final - reference_final).abs().max()) <= MEL_ATOL
    assert streamed.shape == (1, 80, 2 * 37)


@pytest.mark.skipif(accel_trt.trt_unavailable_reason() is not None,
                    reason=f"TensorRT engines cannot be built here: {accel_trt.trt_unavailable_reason()}")
@pytest.mark.parametrize("fp16", [True, False], ids=["fp16", "fp32"])
def test_build_verify_and_use(tiny_cosyvoice2_dir: Path, tmp_path: Path, fp16: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plans = {streaming: accel_trt.build_trt(tiny_cosyvoice2_dir, fp16=fp16, max_batch=4, streaming=streaming,
                                                max_frames=600, out_dir=tmp_path)
                 for streaming in (False, True)}
    for streaming, plan in plans.items():
        assert plan == accel_trt.plan_path(tmp_path, streaming, fp16)
        assert plan.stat().st_size > 0
    flow = CosyVoice2Flow.from_pretrained(tiny_cosyvoice2_dir, device="cuda")
    tokens = torch.randint(0, 6561, (1, 120), generator=torch.Generator().manual_seed(2)).cuda()
    inputs = [t.cuda() for t in prompt(flow)]
    expected = {s: flow.inference(tokens, *inputs, streaming=s, finalize=True) for s in (False, True)}
    wrapper = accel_trt.load_trt_estimator(flow, tmp_path, fp16=fp16)
    assert isinstance(wrapper, accel_trt.TrtEstimator) and set(wrapper.engines) == {False, True}
    tolerance = accel_trt.VERIFY_TOLERANCE[fp16]
    for streaming in (False, True):
        # Through 10 Euler steps the engine's error compounds; allow 5x the one-call check.
        mel = flow.inference(tokens, *inputs, streaming=streaming, finalize=True)
        assert accel_trt.relative_error(mel, expected[streaming]) <= 5 * tolerance
