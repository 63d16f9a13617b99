"""The ONNX export of the flow estimator (cosyapp/accel/onnx_export.py) run with onnxruntime on the CPU
matches the torch estimator within 1e-4, relative to the largest output value, at two batch sizes and two
lengths, for both attention variants (dynamic batch and length in one graph each)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyapp.accel.onnx_export import ESTIMATOR_INPUTS, ESTIMATOR_OUTPUT, export_estimators, onnx_path, random_inputs
from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow

pytest.importorskip("onnx", reason="the ONNX exporter needs the onnx package")
ort = pytest.importorskip("onnxruntime")

RELATIVE_TOLERANCE = 1e-4
SHAPES = [(2, 37), (2, 130), (6, 37), (6, 130)]  # (batch, frames); 130 frames span three 50-frame chunks


@pytest.fixture(scope="module")
def estimator(tiny_cosyvoice2_dir: Path):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return CosyVoice2Flow.from_pretrained(tiny_cosyvoice2_dir).decoder.estimator


@pytest.fixture(scope="module")
def exported(estimator, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and constant-folding notes
        return export_estimators(estimator, tmp_path_factory.mktemp("onnx"))


def test_file_names(exported: dict[bool, Path]) -> None:
    assert exported[False].name == "flow.decoder.estimator.full.fp32.onnx"
    assert exported[True].name == "flow.decoder.estimator.chunk.fp32.onnx"
    assert exported[True] == onnx_path(exported[True].parent, streaming=True)


@pytest.mark.parametrize("streaming", [False, True], ids=["full-attention", "chunk-masks"])
def test_onnxruntime_matches_torch(estimator, exported: dict[bool, Path], streaming: bool) -> None:
    session = ort.InferenceSession(str(exported[streaming]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(ESTIMATOR_INPUTS)
    assert [o.name for o in session.get_outputs()] == [ESTIMATOR_OUTPUT]
    generator = torch.Generator().manual_seed(0)
    for batch, frames in SHAPES:
        inputs = random_inputs(estimator, batch, frames, generator=generator, padded_rows=1)
        with torch.inference_mode():
            expected = estimator(*inputs, streaming).numpy()
        (actual,) = session.run(None, {name: tensor.numpy() for name, tensor in zip(ESTIMATOR_INPUTS, inputs)})
        assert actual.shape == expected.shape == (batch, 80, frames)
        error = float(np.abs(actual - expected).max() / np.abs(expected).max())
        assert error <= RELATIVE_TOLERANCE, f"batch {batch} x {frames} frames: relative error {error:.3g}"


def test_variants_differ(estimator, exported: dict[bool, Path]) -> None:
    """The attention choice is really baked in: the two graphs give different velocities."""
    inputs = random_inputs(estimator, 2, 130, generator=torch.Generator().manual_seed(1))
    feed = {name: tensor.numpy() for name, tensor in zip(ESTIMATOR_INPUTS, inputs)}
    full, chunk = (ort.InferenceSession(str(exported[s]), providers=["CPUExecutionProvider"]).run(None, feed)[0]
                   for s in (False, True))
    assert np.abs(full - chunk).max() > 1e-2
