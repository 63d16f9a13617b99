"""Prompt voices stored on disk: the speaker registry and the default-prompt override.

A stored voice is a folder `<id>/` holding
    prompt.wav    the recording (16-bit PCM WAV, the exact samples the features were computed from)
    prompt.txt    its transcript (empty when unknown; zero-shot requests use it)
    meta.json     backend, model it was computed with, sample rate, duration, creation time, ...
    features.pt   the backend's prompt features (`Backend.voice_state`), so requests skip prompt extraction
The features are recomputed in memory from prompt.wav when they were made by another model.

Writes are atomic: a new folder is written under a temporary name, every file fsync'ed, then renamed into
place; removal renames the folder away before deleting it. A crash therefore leaves either the old or the
new state, plus at worst a hidden `.tmp-*`/`.trash-*` folder that listings ignore and later writes sweep.
The default prompt (`cosyapp prompts set-default`) is replaced in one step by swapping a symlink.

These folders are the local-disk store of a single box; a cluster keeps the same records in its shared store
(cosyapp/storage/redis_store.py). Either kind of stored voice answers `load_voice` through the same few
methods: `key`, `version`, `text`, `meta`, `features_for`, `recording` and `keep_features`.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cosyapp.audio import decode_audio, read_audio_file, wav_bytes
from cosyapp.engine.types import Backend, InputError, Voice

SPEAKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Leftovers of a crashed write or removal older than this are deleted by the next write.
_STALE_AFTER_S = 600.0


def validate_speaker_id(speaker_id: str) -> str:
    """Return the id if it is a safe folder name (letters, digits, `_ . -`, at most 64, no leading dot)."""
    if not isinstance(speaker_id, str) or not SPEAKER_ID.fullmatch(speaker_id):
        raise InputError(f"invalid speaker id {speaker_id[:40]!r}{'...' if len(speaker_id) > 40 else ''}: use 1-64 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    return speaker_id


def features_fingerprint(backend: Backend) -> str:
    """Which model prompt features belong to; stored features from another model are recomputed."""
    info = backend.info()
    return f"{backend.name}|{info.model_type}|{info.model_dir}"


@dataclass(frozen=True)
class VoiceFiles:
    """The contents of a stored voice folder, ready to be written."""

    wav: bytes
    text: str | None
    features: dict[str, Any]
    meta: dict[str, Any]


@dataclass(frozen=True)
class StoredVoice:
    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @cached_property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "meta.json").read_text(encoding="utf-8"))

    @cached_property
    def text(self) -> str | None:
        text = (self.path / "prompt.txt").read_text(encoding="utf-8").strip()
        return text or None

    @property
    def wav_path(self) -> Path:
        return self.path / "prompt.wav"

    @property
    def version(self) -> int:
        """Changes whenever the folder is rewritten (cache key for prepared voices)."""
        return (self.path / "meta.json").stat().st_mtime_ns

    @property
    def key(self) -> str:
        """What identifies this voice in the voice cache (with `version`)."""
        return str(self.path)

    def features_for(self, fingerprint: str) -> dict[str, Any] | None:
        """The stored prompt features when they were made by the model `fingerprint` names and are readable."""
        if self.meta.get("features_for") != fingerprint:
            return None
        try:
            return torch.load(self.path / "features.pt", map_location="cpu", weights_only=True)
        except Exception:  # unreadable features: the recording is the source of truth
            return None

    def recording(self) -> tuple[np.ndarray, int]:
        return read_audio_file(self.wav_path, f"{self.id}/prompt.wav")

    def keep_features(self, fingerprint: str, state: dict[str, Any]) -> None:
        """Features recomputed for another model stay in memory only: the folder keeps its own model's."""


def make_voice_files(backend: Backend, samples: np.ndarray, sample_rate: int, text: str | None,
                     extra_meta: dict[str, Any] | None = None) -> VoiceFiles:
    """Compute a voice's features with `backend` and package them for storage (blocking model work)."""
    wav = wav_bytes(samples, sample_rate)
    # Features come from the 16-bit samples that are stored, so recomputing them from prompt.wav agrees.
    stored_samples, _ = decode_audio(wav)
    voice = backend.prepare_voice(stored_samples, sample_rate, text)
    meta = {
        "backend": backend.name,
        "model_type": backend.info().model_type,
        "features_for": features_fingerprint(backend),
        "sample_rate": sample_rate,
        "duration_s": round(stored_samples.shape[0] / sample_rate, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra_meta or {}),
    }
    return VoiceFiles(wav=wav, text=text, features=backend.voice_state(voice), meta=meta)


def load_voice(stored: StoredVoice, backend: Backend) -> Voice:
    """Rebuild a stored voice for `backend`: from its features when this model made them, else from its recording
    (the store may then keep the recomputed features for the next replica with this model)."""
    fingerprint = features_fingerprint(backend)
    state = stored.features_for(fingerprint)
    if state is not None:
        return backend.voice_from_state(state, stored.text)
    samples, sample_rate = stored.recording()
    voice = backend.prepare_voice(samples, sample_rate, stored.text)
    stored.keep_features(fingerprint, backend.voice_state(voice))
    return voice


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_temp_folder(parent: Path, files: VoiceFiles) -> Path:
    """Write a complete voice folder under a hidden temporary name in `parent` and return it."""
    parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(parent)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        features = io.BytesIO()
        torch.save(files.features, features)
        _write_file(tmp / "prompt.wav", files.wav)
        _write_file(tmp / "prompt.txt", (files.text or "").encode("utf-8"))
        _write_file(tmp / "features.pt", features.getvalue())
        # meta.json last: a folder with meta.json is complete.
        _write_file(tmp / "meta.json", json.dumps(files.meta, ensure_ascii=False, indent=2).encode("utf-8"))
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _sweep_leftovers(parent: Path) -> None:
    now = time.time()
    for entry in parent.iterdir():
        if entry.name.startswith((".tmp-", ".trash-")):
            try:
                if now - entry.lstat().st_mtime > _STALE_AFTER_S:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            except OSError:
                pass  # another process is cleaning it up


class SpeakerRegistry:
    """Registered voices, one folder per speaker id under `root` (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if SPEAKER_ID.fullmatch(p.name) and (p / "meta.json").is_file())

    def get(self, speaker_id: str) -> StoredVoice:
        folder = self.root / validate_speaker_id(speaker_id)
        if not (folder / "meta.json").is_file():
            # The registry's other ids are not listed: they may be other clients' voices.
            raise InputError(f"unknown speaker {speaker_id!r}")
        return StoredVoice(folder)

    def add(self, speaker_id: str, files: VoiceFiles) -> StoredVoice:
        final = self.root / validate_speaker_id(speaker_id)
        if final.exists():
            raise InputError(f"speaker {speaker_id!r} already exists; remove it first")
        tmp = _write_temp_folder(self.root, files)
        try:
            os.rename(tmp, final)  # fails if a concurrent add created a non-empty folder meanwhile
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InputError(f"speaker {speaker_id!r} already exists; remove it first") from None
        _fsync_dir(self.root)
        return StoredVoice(final)

    def remove(self, speaker_id: str) -> None:
        stored = self.get(speaker_id)
        trash = self.root / f".trash-{speaker_id}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(stored.path, trash)  # the speaker disappears atomically; deleting the files can take time
        except FileNotFoundError:
            raise InputError(f"unknown speaker {speaker_id!r}") from None  # removed meanwhile, by another call
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def rename(self, old_id: str, new_id: str) -> StoredVoice:
        stored = self.get(old_id)
        final = self.root / validate_speaker_id(new_id)
        if final.exists():
            raise InputError(f"speaker {new_id!r} already exists")
        try:
            os.rename(stored.path, final)
        except OSError as e:
            raise InputError(f"cannot rename {old_id!r} to {new_id!r}: {e.strerror or e}") from None
        _fsync_dir(self.root)
        return StoredVoice(final)


class DefaultPromptStore:
    """The default prompt set with `cosyapp prompts set-default`, overriding the config's prompt_wav.

    `link` is a symlink to a versioned folder next to it; setting a new default writes a new folder and
    swaps the link with one `os.replace`, so readers always see a complete prompt.
    """

    def __init__(self, link: str | Path) -> None:
        self.link = Path(link)

    def get(self) -> StoredVoice | None:
        if not (self.link / "meta.json").is_file():
            return None
        return StoredVoice(self.link.resolve())

    def set(self, files: VoiceFiles) -> StoredVoice:
        parent = self.link.parent
        folder = _write_temp_folder(parent, files)
        versioned = parent / f".{self.link.name}-{uuid.uuid4().hex[:12]}"
        os.rename(folder, versioned)
        new_link = parent / f".tmp-link-{uuid.uuid4().hex[:8]}"
        os.symlink(versioned.name, new_link)
        previous = self.link.resolve() if self.link.is_symlink() else None
        os.replace(new_link, self.link)
        _fsync_dir(parent)
        if previous is not None and previous != versioned:
            shutil.rmtree(previous, ignore_errors=True)
        return StoredVoice(versioned)

    def clear(self) -> bool:
        """Go back to the config's default prompt; False when none was set."""
        if not self.link.is_symlink():
            return False
        target = self.link.resolve()
        self.link.unlink()
        _fsync_dir(self.link.parent)
        shutil.rmtree(target, ignore_errors=True)
        return True
