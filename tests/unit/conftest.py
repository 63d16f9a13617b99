"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow


@pytest.fixture(scope="module")
def flow(tiny_cosyvoice2_dir: Path) -> CosyVoice2Flow:
    """The tiny CosyVoice2 flow on the CPU (two intra-op threads at most, as on the development machine)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return CosyVoice2Flow.from_pretrained(tiny_cosyvoice2_dir)
