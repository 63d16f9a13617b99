"""The seeds' examples that the service tests run (kept in tests/service) are still the seeds' text, verbatim.

The seeds, the specification, live in ../shared/seeds beside the repository; without them these tests skip."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

TESTS = Path(__file__).resolve().parents[1]
SEEDS = TESTS.parents[1] / "shared" / "seeds"


def _seed(name: str) -> str:
    path = SEEDS / name
    if not path.is_file():
        pytest.skip(f"seed not found at {path}: the seeds live in ../shared/seeds beside the repository")
    return path.read_text(encoding="utf-8")


def _examples(relative: str) -> ModuleType:
    """A data-only module of the service tests, loaded by path: tests/service is not a package."""
    path = TESTS / "service" / relative
    spec = importlib.util.spec_from_file_location(f"seed_examples_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cosyvoice_curl_examples_are_the_seeds_verbatim():
    seed = _seed("004_67245d9cbdc9ef60.txt")
    examples = _examples("seed_curl_examples.py")
    block = re.search(r"#### Example 5: Using cURL\n```bash\n(.*?)```", seed, re.S).group(1)
    assert block == examples.SEED_CURL_BLOCK
    for command in examples.SEED_STATUS_COMMANDS:
        assert command in seed


def test_fish_examples_are_the_seeds_verbatim():
    text = _seed("001_c64fc0332cf8e540.txt")
    module = _examples("fish_client/seed_examples.py")
    examples = {name: value for name, value in vars(module).items() if name.isupper() and name != "SEED_URL"}
    assert len(examples) == 18
    for name, example in examples.items():
        assert f"\n{example}```" in text, f"{name} is not the seed's text"


def test_agent_examples_are_the_seeds_verbatim():
    seed = _seed("000_65ade4a8bd6b83c7.txt")
    examples = _examples("agent_seed_examples.py")
    for heading, language, block in (("### Python", "python", examples.SEED_PYTHON),
                                     ("### JavaScript/Node.js", "javascript", examples.SEED_JAVASCRIPT),
                                     ("### cURL (Command Line)", "bash", examples.SEED_CURL_BLOCK)):
        assert f"{heading}\n\n```{language}\n{block}```" in seed
