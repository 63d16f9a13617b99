"""`fish_speech.utils.file` as the seed's examples use it."""

from __future__ import annotations

from pathlib import Path


def audio_to_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def read_ref_text(path: str) -> str:
    return Path(path).read_text(encoding="utf-8").strip()
