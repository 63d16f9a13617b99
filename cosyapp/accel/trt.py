"""TensorRT engines for the CosyVoice2 flow estimator: build from the ONNX export, check against torch, run.

This module imports without TensorRT or CUDA; `tensorrt` is imported only to build or load an engine, and
`trt_unavailable_reason()` says why that cannot happen here.

Plans live next to the model, one per attention variant (see onnx_export.py):
    flow.decoder.estimator.{full|chunk}.{fp16|fp32}.<gpu>.trt<version>.plan
A plan only runs on the GPU model and TensorRT version that built it, so both are in the name: a plan
from another machine is simply not found, and `cosyapp models build-trt` builds the missing one.

Precision: the network is strongly typed and takes its precision from the ONNX graph, which is exported
from the estimator cast to the engine's dtype (TensorRT 11 only builds strongly typed networks; the
FP16 builder flag of weakly typed ones is deprecated since 10.12). Float16 engines take and return
float16 tensors; the runtime casts from and to the caller's dtype.

Profile: batch 2 (one CFG pair) .. max_batch (CFG pairs of max_batch / 2 streams), 4 .. 3000 mel frames
(prompt + speech; 60 s), tuned for one pair of 500 frames.

Runtime: `TrtEstimator` has the estimator's forward signature and replaces `flow.decoder.estimator`.
Calls without a chunk cache whose shape the profile covers go to the engine of their attention variant;
cached (incremental) calls and anything else go to the torch estimator it wraps. Each engine runs on its
own CUDA stream, ordered after the caller's stream and before the caller's next work by stream waits (no
host synchronisation), into an output buffer kept per calling thread.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cosyapp.accel.onnx_export import ESTIMATOR_INPUTS, ESTIMATOR_OUTPUT, export_estimator, onnx_path, random_inputs
from cosyapp.backends.cosyvoice2.chunk_cache import ChunkCache
from cosyapp.backends.cosyvoice2.estimator import CausalConditionalDecoder
from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow

log = logging.getLogger(__name__)

MIN_BATCH = 2  # one CFG pair
OPT_BATCH, OPT_FRAMES = 2, 500
MIN_FRAMES, MAX_FRAMES = 4, 3000
# Check tolerance, max |engine - torch float32| / max |torch float32| on random inputs, keyed by fp16.
# On the tiny model float16 rounding gives ~3e-3 and the wrong attention variant ~0.3: 5e-2 leaves the
# deeper real model room for rounding and still catches a wrong graph.
VERIFY_TOLERANCE = {True: 5e-2, False: 1e-3}


class TrtError(RuntimeError):
    """TensorRT is missing, or an engine cannot be built, loaded or trusted."""


def trt_unavailable_reason() -> str | None:
    """Why TensorRT engines cannot be used here, or None when they can."""
    try:
        import tensorrt
    except ImportError as exc:
        return f"the tensorrt package is not installed ({exc})"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major = int(tensorrt.__version__.split(".")[0])
    if major < 10:
        return f"TensorRT {tensorrt.__version__} is too old (10 or newer is needed)"
    return None


def _tensorrt() -> Any:
    reason = trt_unavailable_reason()
    if reason:
        raise TrtError(f"TensorRT cannot be used: {reason}")
    import tensorrt

    return tensorrt


_LOGGER: Any = None


def _trt_logger(trt: Any) -> Any:
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def gpu_tag(name: str) -> str:
    """File-name form of a GPU name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def plan_name(streaming: bool, fp16: bool, gpu_name: str, trt_version: str) -> str:
    variant = "chunk" if streaming else "full"
    precision = "fp16" if fp16 else "fp32"
    return f"flow.decoder.estimator.{variant}.{precision}.{gpu_tag(gpu_name)}.trt{trt_version}.plan"


def plan_path(model_dir: str | Path, streaming: bool, fp16: bool = True, device: torch.device | str = "cuda") -> Path:
    """The plan for this GPU and the installed TensorRT (both must be present)."""
    trt = _tensorrt()
    return Path(model_dir) / plan_name(streaming, fp16, torch.cuda.get_device_name(device), trt.__version__)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|, in float32."""
    expected = expected.float()
    return float((actual.float() - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


# ---- build --------------------------------------------------------------------------------------------------


def build_trt(model_dir: str | Path, fp16: bool = True, max_batch: int = 16, streaming: bool = False,
              max_frames: int = MAX_FRAMES, out_dir: str | Path | None = None, workspace_gib: float = 4.0,
              force: bool = False, verify: bool = True, device: str = "cuda") -> Path:
    """Build (or keep, when present and not `force`) the estimator engine of one attention variant for this
    GPU: ONNX export in the engine's precision, engine build, check against the float32 torch estimator on
    random inputs. Returns the plan path (in `out_dir`, default the model directory). Call it once with
    streaming=False and once with streaming=True for both variants.

    max_batch is the largest estimator batch, i.e. 2 x the streams whose flow calls are batched together.
    """
    trt = _tensorrt()
    if max_batch < MIN_BATCH or max_frames < MIN_FRAMES:
        raise ValueError(f"max_batch {max_batch} must be >= {MIN_BATCH} and max_frames {max_frames} >= {MIN_FRAMES}")
    out_dir = Path(out_dir or model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    plan = out_dir / plan_name(streaming, fp16, torch.cuda.get_device_name(device), trt.__version__)
    flow = CosyVoice2Flow.from_pretrained(model_dir, device=device)
    estimator = flow.decoder.estimator
    if plan.is_file() and plan.stat().st_size > 0 and not force:
        log.info("%s exists; not rebuilding (force=True rebuilds)", plan)
        return plan

    dtype = torch.float16 if fp16 else torch.float32
    onnx_file = onnx_path(out_dir, streaming, dtype)
    log.info("exporting %s", onnx_file)
    export_estimator(copy.deepcopy(estimator).to(dtype), onnx_file, streaming)
    log.info("building %s (batch %d..%d, frames %d..%d); this takes minutes on the real model",
             plan, MIN_BATCH, max_batch, MIN_FRAMES, max_frames)
    n_mels = estimator.final_proj.out_channels
    serialized = _build_serialized(trt, onnx_file, _profile_shapes(n_mels, max_batch, max_frames),
                                   int(workspace_gib * (1 << 30)), exact_float32=not fp16)
    partial = plan.with_name(plan.name + f".{os.getpid()}.partial")
    partial.write_bytes(serialized)
    partial.replace(plan)
    if verify:
        try:
            errors = verify_engine(TrtEngine(plan, device), estimator, streaming)
        except TrtError:
            plan.unlink(missing_ok=True)
            raise
        log.info("%s matches torch: relative errors %s", plan.name, ", ".join(f"{e:.2e}" for e in errors))
    return plan


def _profile_shapes(n_mels: int, max_batch: int, max_frames: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every input."""
    batches = (MIN_BATCH, min(OPT_BATCH, max_batch), max_batch)
    frames = (MIN_FRAMES, min(OPT_FRAMES, max_frames), max_frames)
    per_frame = {"x": n_mels, "mask": 1, "mu": n_mels, "cond": n_mels}
    shapes = {name: tuple((b, c, f) for b, f in zip(batches, frames)) for name, c in per_frame.items()}
    shapes["t"] = tuple((b,) for b in batches)
    shapes["spks"] = tuple((b, n_mels) for b in batches)
    return shapes


def _build_serialized(trt: Any, onnx_file: Path, shapes: dict[str, tuple[tuple[int, ...], ...]],
                      workspace_bytes: int, exact_float32: bool) -> bytes:
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrtError(f"{onnx_file}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if exact_float32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default; a float32 engine should be float32
    profile = builder.create_optimization_profile()
    for name, (smallest, typical, largest) in shapes.items():
        profile.set_shape(name, smallest, typical, largest)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TrtError(f"TensorRT could not build an engine from {onnx_file} (its log above says why)")
    return bytes(serialized)


@torch.inference_mode()
def verify_engine(engine: "TrtEngine", estimator: CausalConditionalDecoder, streaming: bool,
                  tolerance: float | None = None, seed: int = 0) -> list[float]:
    """Run engine and float32 torch estimator on random inputs at a few shapes of the profile (smallest
    pair, a short batch at the largest batch, the longest pair); TrtError if any relative error exceeds
    `tolerance` (default by engine precision). Returns the errors."""
    if tolerance is None:
        tolerance = VERIFY_TOLERANCE[engine.dtype == torch.float16]
    reference = estimator
    if next(estimator.parameters()).dtype != torch.float32:
        reference = copy.deepcopy(estimator).float()  # Module.float() would convert the live one in place
    generator = torch.Generator().manual_seed(seed)
    cases = [(MIN_BATCH, min(75, engine.max_frames)), (engine.max_batch, min(300, engine.max_frames)),
             (MIN_BATCH, engine.max_frames)]
    errors = []
    for batch, frames in cases:
        inputs = random_inputs(reference, batch, frames, engine.device, torch.float32, generator,
                               padded_rows=1)
        error = relative_error(engine(*inputs), reference(*inputs, streaming))
        if not error <= tolerance:  # also catches NaN
            raise TrtError(f"{engine.plan.name}: batch {batch} x {frames} frames differs from torch by {error:.3g} "
                           f"(relative to the largest value; tolerance {tolerance:g})")
        errors.append(error)
    return errors


# ---- run ----------------------------------------------------------------------------------------------------


class TrtEngine:
    """One deserialized estimator engine with one execution context, run on its own CUDA stream.

    Calls from several threads are serialised on the context; each thread gets its own output buffer, so
    a result stays valid until the same thread's next call.
    """

    def __init__(self, plan: str | Path, device: torch.device | str = "cuda") -> None:
        trt = _tensorrt()
        self.plan = Path(plan)
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(_trt_logger(trt))
            self.engine = self.runtime.deserialize_cuda_engine(self.plan.read_bytes())
            if self.engine is None:
                raise TrtError(f"{self.plan}: TensorRT cannot load it (built for another GPU or TensorRT version?)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if names != {*ESTIMATOR_INPUTS, ESTIMATOR_OUTPUT}:
            raise TrtError(f"{self.plan}: tensors {sorted(names)} are not the estimator's "
                           f"{[*ESTIMATOR_INPUTS, ESTIMATOR_OUTPUT]}")
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        self.dtypes = {name: dtypes[self.engine.get_tensor_dtype(name)] for name in names}
        self.dtype = self.dtypes["x"]
        smallest, _, largest = self.engine.get_tensor_profile_shape("x", 0)
        self.n_mels = largest[1]
        self.min_batch, self.min_frames = smallest[0], smallest[2]
        self.max_batch, self.max_frames = largest[0], largest[2]
        self._lock = threading.Lock()
        self._outputs = threading.local()

    def supports(self, batch: int, frames: int) -> bool:
        return self.min_batch <= batch <= self.max_batch and self.min_frames <= frames <= self.max_frames

    def __call__(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
        """The estimator's forward (attention variant fixed by the plan) -> velocity [B, 80, T] in x's dtype."""
        batch, _, frames = x.shape
        inputs = {name: tensor.to(self.device, self.dtypes[name]).contiguous()
                  for name, tensor in zip(ESTIMATOR_INPUTS, (x, mask, mu, t, spks, cond))}
        output = self._output(batch, frames)
        caller = torch.cuda.current_stream(self.device)
        with self._lock:
            self.stream.wait_stream(caller)  # the inputs (and this thread's last use of `output`) are queued there
            for name, tensor in inputs.items():
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            self.context.set_tensor_address(ESTIMATOR_OUTPUT, output.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise TrtError(f"{self.plan.name}: execution failed for batch {batch} x {frames} frames")
        caller.wait_stream(self.stream)
        for tensor in inputs.values():
            tensor.record_stream(self.stream)  # keep the allocator from reusing them before the engine ran
        return output.to(x.dtype)

    def _output(self, batch: int, frames: int) -> Tensor:
        needed = batch * self.n_mels * frames
        buffer = getattr(self._outputs, "buffer", None)
        if buffer is None or buffer.numel() < needed:
            buffer = torch.empty(max(needed, self.n_mels * OPT_FRAMES * OPT_BATCH), device=self.device,
                                 dtype=self.dtypes[ESTIMATOR_OUTPUT])
            self._outputs.buffer = buffer
        return buffer[:needed].view(batch, self.n_mels, frames)


class TrtEstimator(nn.Module):
    """Drop-in for `CausalConditionalDecoder`: TensorRT for the calls its engines cover, torch otherwise."""

    def __init__(self, estimator: CausalConditionalDecoder, engines: dict[bool, TrtEngine]) -> None:
        super().__init__()
        self.torch_estimator = estimator
        self.engines = engines  # by `streaming`

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor,
                streaming: bool = False, cache: ChunkCache | None = None) -> Tensor:
        engine = self.engines.get(streaming)
        if cache is not None or engine is None or not engine.supports(x.size(0), x.size(2)):
            return self.torch_estimator(x, mask, mu, t, spks, cond, streaming, cache)
        return engine(x, mask, mu, t, spks, cond)


def use_trt_estimator(flow: CosyVoice2Flow, engines: dict[bool, TrtEngine]) -> TrtEstimator:
    """Route the flow's estimator calls through `engines` ({streaming: engine}); returns the new estimator."""
    estimator = flow.decoder.estimator
    if isinstance(estimator, TrtEstimator):
        estimator = estimator.torch_estimator
    wrapper = TrtEstimator(estimator, engines)
    flow.decoder.estimator = wrapper
    return wrapper


def load_trt_estimator(flow: CosyVoice2Flow, model_dir: str | Path, fp16: bool = True,
                       verify: bool = True) -> TrtEstimator | None:
    """Use the plans built for this GPU and TensorRT version in `model_dir`, when there are any and they load
    and pass `verify_engine`. Returns the new estimator, or None (the reason logged) with the flow unchanged."""
    reason = trt_unavailable_reason()
    device = flow.encoder_proj.weight.device
    if reason is None and device.type != "cuda":
        reason = f"the flow runs on {device}"
    if reason:
        log.info("TensorRT estimator not used: %s", reason)
        return None
    estimator = flow.decoder.estimator
    if isinstance(estimator, TrtEstimator):
        estimator = estimator.torch_estimator
    engines = {}
    for streaming in (False, True):
        plan = plan_path(model_dir, streaming, fp16, device)
        if not plan.is_file():
            log.info("TensorRT estimator: no %s (cosyapp models build-trt builds it)", plan.name)
            continue
        try:
            engine = TrtEngine(plan, device)
            if verify:
                verify_engine(engine, estimator, streaming)
        except (TrtError, RuntimeError) as exc:
            log.warning("TensorRT estimator: %s not used: %s", plan.name, exc)
            continue
        engines[streaming] = engine
    if not engines:
        return None
    log.info("TensorRT estimator in use for %s attention", " and ".join("chunk" if s else "full" for s in engines))
    return use_trt_estimator(flow, engines)
