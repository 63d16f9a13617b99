"""Shared fixtures and options.

The service, CLI, engine and unit tests run on random tiny models that `make_tiny` writes once per session,
so they need nothing outside the repository. Only the parity tests (tests/parity) read golden data: the folder
`--golden DIR` names (a backend's folder, or a parent holding `cosyvoice2/`, `cosyvoice3/` and/or `fish/`), by
default `../shared/golden` beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

from cosyapp.engine.registry import make_tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GOLDEN = REPO_ROOT.parent / "shared" / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--golden",
        default=str(DEFAULT_GOLDEN),
        help="golden folder of the parity tests: a backend folder (cosyvoice2, cosyvoice3 or fish format) or a "
             "parent holding them (default: ../shared/golden beside the repository)",
    )


def _tiny_model(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"tiny_{backend}")
    make_tiny(backend, out, size="tiny")
    return out


@pytest.fixture(scope="session")
def tiny_cosyvoice2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CosyVoice2 model in the official layout, for end-to-end, service, CLI and unit tests."""
    return _tiny_model("cosyvoice2", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_cosyvoice3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CosyVoice3 model in the official layout, for the CosyVoice3 backend tests."""
    return _tiny_model("cosyvoice3", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_fish_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Fish model in the release layout, for the Fish backend and service tests."""
    return _tiny_model("fish", tmp_path_factory)
