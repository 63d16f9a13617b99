"""Model-file reading shared by the backends: devices and dtypes, JSON files and torch state dicts with
errors that name the file, and weight-norm folding."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from cosyapp.engine.types import ModelFileError


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """"auto": the GPU when there is one, else the CPU; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto": float32 on the CPU (exact parity with upstream), bfloat16 for the transformer on a GPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}") from None


def read_json_file(path: str | Path) -> Any:
    """Parse a JSON file of a model directory; a missing or malformed file raises ModelFileError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc})") from exc


def load_state_dict(path: str | Path, strip_prefix: str = "") -> dict[str, torch.Tensor]:
    """`torch.load(weights_only=True)` of a flat state dict; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise ModelFileError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: expected a flat state dict of tensors")
    if strip_prefix:
        state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
    return state


def fold_weight_norm(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Replace weight-norm pairs by the effective weight `g * v / ||v||` (norm over every dim but 0).

    Accepts both spellings torch has used: `X.parametrizations.weight.original0/original1` and
    `X.weight_g/X.weight_v`. Inference never needs the decomposition, so modules hold plain weights. The fold
    runs in `dtype` (a module that runs in float64 should get its weights folded in float64).
    """
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for g_suffix, v_suffix in ((".parametrizations.weight.original0", ".parametrizations.weight.original1"),
                                   (".weight_g", ".weight_v")):
            if key.endswith(g_suffix):
                pairs.setdefault(key[: -len(g_suffix)], {})["g"] = value
                break
            if key.endswith(v_suffix):
                pairs.setdefault(key[: -len(v_suffix)], {})["v"] = value
                break
        else:
            out[key] = value
    for base, pair in pairs.items():
        if set(pair) != {"g", "v"}:
            raise ModelFileError(f"weight-norm parameter {base} is missing its {'g' if 'v' in pair else 'v'} half")
        g, v = pair["g"].to(dtype), pair["v"].to(dtype)
        norm = v.norm(dim=tuple(range(1, v.dim())), keepdim=True)
        out[base + ".weight"] = g * v / norm
    return out


def check_keys(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module` strictly; a mismatch names the file and the offending keys and shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:5]))
        raise ModelFileError(f"{source}: does not match the model config: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
