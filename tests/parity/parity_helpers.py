"""Comparisons and LM drivers that the CosyVoice2 and CosyVoice3 parity tests share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM


def assert_close(ours: torch.Tensor | np.ndarray, ref: np.ndarray, atol: float, name: str) -> None:
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != golden {ref.shape}"
    err = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    assert err <= atol, f"{name}: max abs diff {err:.3g} > {atol:g}"


def assert_equal(ours: torch.Tensor | np.ndarray | list, ref: np.ndarray, name: str) -> None:
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != golden {ref.shape}"
    mismatches = int((ours != ref).sum())
    assert mismatches == 0, f"{name}: {mismatches} of {ref.size} values differ"


def assert_model_input(model_input: Any, keys: Sequence[str], golden: dict[str, np.ndarray], mode: str,
                       atol: float) -> None:
    """Each of `keys` of the frontend's model input against golden `<mode>__<key>`: lengths and ids exactly,
    floats within `atol`; the golden set must hold no other key for `mode`."""
    assert len(keys) == len([k for k in golden if k.startswith(f"{mode}__")])
    for field in keys:
        ours, ref, name = getattr(model_input, field), golden[f"{mode}__{field}"], f"{mode}__{field}"
        if field.endswith("_len"):
            assert_equal([ours], ref, name)
        elif ref.dtype.kind == "f":
            assert_close(ours, ref, atol, name)
        else:
            assert_equal(ours, ref, name)


@torch.inference_mode()
def forced_hidden(lm: CosyVoice2LM, lm_input: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Incremental KV-cache path: prefill, then feed speech_embedding[forced[i]] one token at a time.
    Returns the last hidden state of each call, [len(forced) + 1, hidden]."""
    length = lm_input.shape[1]
    lm.setup_cache(1, length + len(forced))
    rows = [lm(lm_input, torch.arange(length)[None], 0, length)[0, -1]]
    for i, token in enumerate(forced):
        x = lm.speech_embedding(token.view(1, 1))
        rows.append(lm(x, torch.tensor([[length + i]]), 0, length + i + 1)[0, -1])
    return torch.stack(rows)
