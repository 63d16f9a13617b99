"""Shared pytest options: `--golden DIR` points the parity tests at a golden folder (either backend's
folder, or a parent holding `cosyvoice2/` and/or `fish/`)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GOLDEN = REPO_ROOT.parent / "shared" / "golden"
TINY_COSYVOICE2 = DEFAULT_GOLDEN / "cosyvoice2" / "tiny"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--golden",
        default=str(DEFAULT_GOLDEN),
        help="golden folder: a backend folder (cosyvoice2 or fish format) or a parent holding them",
    )


def _backend_of(folder: Path) -> str | None:
    if (folder / "settings.json").is_file() and (folder / "tiny" / "cosyvoice2.yaml").is_file():
        return "cosyvoice2"
    if (folder / "goldens.json").is_file() and (folder / "tiny" / "config.json").is_file():
        return "fish"
    return None


def golden_folders(root: Path) -> dict[str, Path]:
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


@pytest.fixture(scope="session")
def golden_root(pytestconfig: pytest.Config) -> Path:
    return Path(pytestconfig.getoption("--golden")).expanduser().resolve()


@pytest.fixture(scope="session")
def cosyvoice2_golden(golden_root: Path) -> Path:
    folder = golden_folders(golden_root).get("cosyvoice2")
    if folder is None:
        pytest.skip(f"no CosyVoice2 golden folder in {golden_root}")
    return folder


@pytest.fixture(scope="session")
def tiny_cosyvoice2_dir() -> Path:
    """The tiny CosyVoice2 model used by end-to-end, service and CLI tests."""
    if not (TINY_COSYVOICE2 / "cosyvoice2.yaml").is_file():
        pytest.skip(f"tiny CosyVoice2 model not found at {TINY_COSYVOICE2}")
    return TINY_COSYVOICE2
