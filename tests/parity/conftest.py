"""Parity-test fixtures: the golden folders (`--golden DIR`, by default ../shared/golden beside the repository),
the CosyVoice2 golden settings, config and vocoder shared by several test files, the CosyVoice3 golden settings
and arrays, and the Fish golden files and models loaded from them. Every test here skips, with one reason, when
its golden set is missing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cosyapp.backends.cosyvoice2.config import CosyVoice2Config
from cosyapp.backends.cosyvoice2.hift import HiFTGenerator

_BACKEND_NAMES = {"cosyvoice2": "CosyVoice2", "cosyvoice3": "CosyVoice3", "fish": "Fish"}


def _backend_of(folder: Path) -> str | None:
    if (folder / "settings.json").is_file() and (folder / "tiny" / "cosyvoice2.yaml").is_file():
        return "cosyvoice2"
    if (folder / "settings.json").is_file() and (folder / "tiny" / "cosyvoice3.yaml").is_file():
        return "cosyvoice3"
    if (folder / "goldens.json").is_file() and (folder / "tiny" / "config.json").is_file():
        return "fish"
    return None


def _golden_folders(root: Path) -> dict[str, Path]:
    """Backend -> golden folder: `root` itself if it is one, else its first child of each backend."""
    found: dict[str, Path] = {}
    own = _backend_of(root)
    if own:
        found[own] = root
    elif root.is_dir():
        for child in sorted(root.iterdir()):
            kind = _backend_of(child) if child.is_dir() else None
            if kind and kind not in found:
                found[kind] = child
    return found


def golden_folder(root: Path, backend: str) -> Path:
    """The golden folder of `backend` under `root`; skips the test, saying where the data comes from, if none."""
    found = _golden_folders(root)
    if backend not in found:
        where = f"golden data not found at {root}" if not found else \
            f"no {_BACKEND_NAMES[backend]} golden set in {root} (found: {', '.join(sorted(found))})"
        pytest.skip(f"{where}: the golden sets live in ../shared/golden beside the repository, or pass --golden DIR")
    return found[backend]


def npz_loader(folder: Path) -> Callable[[str], dict[str, np.ndarray]]:
    """`get(name)` -> the arrays of `folder/<name>.npz`, read once per file and kept for the session."""
    cache: dict[str, dict[str, np.ndarray]] = {}

    def get(name: str) -> dict[str, np.ndarray]:
        if name not in cache:
            with np.load(folder / f"{name}.npz", allow_pickle=False) as data:
                cache[name] = dict(data)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def golden_root(pytestconfig: pytest.Config) -> Path:
    return Path(pytestconfig.getoption("--golden")).expanduser().resolve()


@pytest.fixture(scope="session")
def cosyvoice2_golden(golden_root: Path) -> Path:
    return golden_folder(golden_root, "cosyvoice2")


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
def cosyvoice3_golden(golden_root: Path) -> Path:
    return golden_folder(golden_root, "cosyvoice3")


@pytest.fixture(scope="session")
def cv3_settings(cosyvoice3_golden: Path) -> dict:
    return json.loads((cosyvoice3_golden / "settings.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def cv3_npz(cosyvoice3_golden: Path):
    """`cv3_npz("flow")` -> the arrays of the CosyVoice3 flow.npz (loaded once per file)."""
    return npz_loader(cosyvoice3_golden)


@pytest.fixture(scope="session")
def fish_golden(golden_root: Path) -> Path:
    return golden_folder(golden_root, "fish")


@pytest.fixture(scope="session")
def fish_goldens_json(fish_golden: Path) -> dict[str, Any]:
    return json.loads((fish_golden / "goldens.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def fish_npz(fish_golden: Path):
    """`fish_npz("codec")` -> the arrays of codec.npz (loaded once per file)."""
    return npz_loader(fish_golden)


@pytest.fixture(scope="session")
def fish_backend(fish_golden: Path):
    """The golden tiny checkpoint loaded like production, in float32 on the CPU (the goldens' precision)."""
    from cosyapp.backends.fish.backend import load

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load(fish_golden / "tiny", device="cpu", dtype="float32")
