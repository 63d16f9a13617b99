"""Parity-test fixtures: the CosyVoice2 golden settings, config and vocoder shared by several test files;
`fish_golden` (the Fish golden folder) and the Fish models loaded from it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cosyapp.backends.cosyvoice2.config import CosyVoice2Config
from cosyapp.backends.cosyvoice2.hift import HiFTGenerator


def _root_conftest():
    """tests/conftest.py as a module. Both conftests are top-level modules named `conftest`, so a plain
    import would find this file instead; load the parent by path (once) under its own name."""
    name = "cosyapp_tests_root_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def settings(cosyvoice2_golden: Path) -> dict:
    return json.loads((cosyvoice2_golden / "settings.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def config(cosyvoice2_golden: Path) -> CosyVoice2Config:
    return CosyVoice2Config.from_model_dir(cosyvoice2_golden / "tiny")


@pytest.fixture(scope="module")
def hift(cosyvoice2_golden: Path, config: CosyVoice2Config) -> HiFTGenerator:
    return HiFTGenerator.from_pretrained(cosyvoice2_golden / "tiny", config)


@pytest.fixture(scope="session")
def fish_golden(golden_root: Path) -> Path:
    folder = _root_conftest().golden_folders(golden_root).get("fish")
    if folder is None:
        pytest.skip(f"no Fish golden folder in {golden_root}")
    return folder


@pytest.fixture(scope="session")
def fish_goldens_json(fish_golden: Path) -> dict[str, Any]:
    return json.loads((fish_golden / "goldens.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def fish_npz(fish_golden: Path):
    """`fish_npz("codec")` -> the arrays of codec.npz (loaded once per file)."""
    cache: dict[str, dict[str, np.ndarray]] = {}

    def get(name: str) -> dict[str, np.ndarray]:
        if name not in cache:
            with np.load(fish_golden / f"{name}.npz", allow_pickle=False) as data:
                cache[name] = dict(data)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def fish_backend(fish_golden: Path):
    """The golden tiny checkpoint loaded like production, in float32 on the CPU (the goldens' precision)."""
    from cosyapp.backends.fish.backend import load

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load(fish_golden / "tiny", device="cpu", dtype="float32")
