"""The on-disk voice stores: id validation, atomic writes, rename/remove, the default-prompt symlink swap, and
rebuilding voices from stored features (with the real backend on the tiny model)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyapp import voices
from cosyapp.audio import read_audio_file
from cosyapp.engine.types import InputError
from cosyapp.voices import (
    DefaultPromptStore,
    SpeakerRegistry,
    VoiceFiles,
    features_fingerprint,
    load_voice,
    make_voice_files,
    validate_speaker_id,
)

PROMPT = Path(__file__).resolve().parents[2] / "asset" / "zero_shot_prompt.wav"


def _files(text: str | None = "hello", marker: float = 1.0) -> VoiceFiles:
    return VoiceFiles(wav=b"RIFF-not-checked-here", text=text, features={"x": torch.full((3,), marker)},
                      meta={"backend": "test", "features_for": "test", "duration_s": 1.0})


@pytest.mark.parametrize("good", ["a", "clerk", "Clerk_2", "zh-CN.female", "9", "x" * 64])
def test_valid_ids(good: str):
    assert validate_speaker_id(good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "/abs", ".hidden", "-dash", "a b", "é", "x" * 65,
                                 "a\\b", "a\x00b", "con:1"])
def test_invalid_ids(bad: str):
    with pytest.raises(InputError, match="invalid speaker id"):
        validate_speaker_id(bad)


def test_add_get_list_rename_remove(tmp_path: Path):
    registry = SpeakerRegistry(tmp_path / "speakers")
    assert registry.ids() == []
    stored = registry.add("b", _files("second"))
    registry.add("a", _files(None))
    assert registry.ids() == ["a", "b"]
    assert stored.text == "second" and registry.get("a").text is None
    assert stored.meta["backend"] == "test"
    assert torch.equal(torch.load(stored.path / "features.pt", weights_only=True)["x"], torch.ones(3))
    with pytest.raises(InputError, match="already exists"):
        registry.add("a", _files())
    with pytest.raises(InputError, match="already exists"):
        registry.rename("a", "b")
    renamed = registry.rename("a", "c")
    assert registry.ids() == ["b", "c"] and renamed.id == "c"
    registry.remove("b")
    assert registry.ids() == ["c"]
    with pytest.raises(InputError, match="unknown speaker 'b'$"):  # other voices' ids are not told
        registry.get("b")
    assert sorted(p.name for p in registry.root.iterdir()) == ["c"]


def test_a_crash_mid_write_leaves_the_registry_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    registry = SpeakerRegistry(tmp_path / "speakers")
    registry.add("kept", _files())
    real_write = voices._write_file

    def crash_on_meta(path: Path, data: bytes) -> None:
        if path.name == "meta.json":
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(voices, "_write_file", crash_on_meta)
    with pytest.raises(OSError, match="No space left"):
        registry.add("new", _files())
    monkeypatch.undo()
    assert registry.ids() == ["kept"]
    assert sorted(p.name for p in registry.root.iterdir()) == ["kept"]  # the temporary folder is gone

    # A process killed outright leaves a hidden temporary folder: invisible, and swept once stale.
    leftover = registry.root / ".tmp-crashed"
    leftover.mkdir()
    (leftover / "prompt.wav").write_bytes(b"partial")
    assert registry.ids() == ["kept"]
    old = time.time() - 3600
    os.utime(leftover, (old, old))
    registry.add("next", _files())
    assert not leftover.exists() and registry.ids() == ["kept", "next"]


def test_incomplete_and_foreign_folders_are_not_speakers(tmp_path: Path):
    registry = SpeakerRegistry(tmp_path)
    (tmp_path / "no_meta").mkdir()
    (tmp_path / ".trash-x-1234").mkdir()
    (tmp_path / "a file.txt").write_text("x")
    assert registry.ids() == []


def test_default_prompt_store_swaps_atomically(tmp_path: Path):
    store = DefaultPromptStore(tmp_path / "default_prompt")
    assert store.get() is None
    first = store.set(_files("one", marker=1.0))
    assert store.link.is_symlink() and store.get().path == first.path and store.get().text == "one"
    second = store.set(_files("two", marker=2.0))
    assert store.get().path == second.path and store.get().text == "two"
    assert not first.path.exists()  # the previous version is removed after the swap
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["default_prompt", second.path.name])
    assert store.clear() and store.get() is None and list(tmp_path.iterdir()) == []
    assert not store.clear()


@pytest.fixture(scope="module")
def backend(tiny_cosyvoice2_dir: Path):
    from cosyapp.engine.registry import load_backend

    return load_backend("cosyvoice2", tiny_cosyvoice2_dir, device="cpu")


def test_stored_voices_reload_from_features_or_recompute(backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    samples, rate = read_audio_file(PROMPT)
    files = make_voice_files(backend, samples, rate, "欢迎光临", {"source_file": "p.wav"})
    assert files.meta["features_for"] == features_fingerprint(backend) and files.meta["source_file"] == "p.wav"
    stored = SpeakerRegistry(tmp_path).add("clerk", files)
    expected = files.features

    # Same model: features.pt is used as is, no prompt extraction.
    def no_extraction(*args, **kwargs):
        raise AssertionError("prompt features were recomputed")

    monkeypatch.setattr(backend, "prepare_voice", no_extraction)
    reloaded = load_voice(stored, backend)
    assert reloaded.text == "欢迎光临"
    assert torch.equal(backend.voice_state(reloaded)["speech_token"], expected["speech_token"])
    monkeypatch.undo()

    # Features made by another model, or unreadable ones, are recomputed from prompt.wav.
    meta = json.loads((stored.path / "meta.json").read_text())
    (stored.path / "meta.json").write_text(json.dumps({**meta, "features_for": "another|model"}))
    recomputed = load_voice(voices.StoredVoice(stored.path), backend)
    assert torch.equal(backend.voice_state(recomputed)["speech_token"], expected["speech_token"])
    (stored.path / "meta.json").write_text(json.dumps(meta))
    (stored.path / "features.pt").write_bytes(b"corrupt")
    recomputed = load_voice(voices.StoredVoice(stored.path), backend)
    assert np.allclose(backend.voice_state(recomputed)["embedding"], expected["embedding"], atol=1e-5)
