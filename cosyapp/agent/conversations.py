"""Conversation memory: a conversation's system message, its last messages and its voice, by conversation_id.

`ConversationStore` is what the agent needs of a store; `FileConversationStore` keeps each conversation in a
folder `<root>/<conversation_id>/` holding `conversation.json` (system message, messages, when it was last
used) and `voice.wav` (the recording its voice is cloned from, when it was given one), written atomically
(temporary file, fsync, rename), so a conversation survives restarts. It is bounded: a conversation keeps its
last `max_messages` messages, and conversations idle for longer than `idle_expiry_s` are deleted."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cosyapp.server.fish_tasks import _write_atomic as write_atomic

log = logging.getLogger("cosyapp.agent")

CONVERSATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # becomes a folder name
RECORD_FILE = "conversation.json"
VOICE_FILE = "voice.wav"


@dataclass
class Conversation:
    id: str
    system_message: str | None = None
    # {"role": "user" | "assistant", "content": text, "audio_s": seconds of speech (assistant messages)}
    messages: list[dict] = field(default_factory=list)
    voice: bytes | None = None  # a WAV recording to clone the voice from; None: the default voice
    updated_at: float = 0.0


class ConversationStore(Protocol):
    async def load(self, conversation_id: str) -> Conversation | None: ...

    async def save(self, conversation: Conversation) -> None: ...


class FileConversationStore:
    def __init__(self, root: Path, max_messages: int, idle_expiry_s: float) -> None:
        self.root = Path(root)
        self.max_messages = max_messages
        self.idle_expiry_s = idle_expiry_s
        self._swept_at = 0.0

    async def load(self, conversation_id: str) -> Conversation | None:
        return await asyncio.to_thread(self._load, conversation_id)

    async def save(self, conversation: Conversation) -> None:
        conversation.messages = conversation.messages[-self.max_messages:]
        conversation.updated_at = time.time()
        await asyncio.to_thread(self._save, conversation)

    def _expired(self, updated_at: float) -> bool:
        return self.idle_expiry_s > 0 and updated_at < time.time() - self.idle_expiry_s

    def _load(self, conversation_id: str) -> Conversation | None:
        self._sweep()
        folder = self.root / conversation_id
        try:
            record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
            voice_file = folder / VOICE_FILE
            voice = voice_file.read_bytes() if record.get("voice_sha256") and voice_file.exists() else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("starting conversation %s afresh: its record is unreadable: %s", conversation_id, e)
            return None
        if self._expired(record.get("updated_at", 0.0)):
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return Conversation(conversation_id, record.get("system_message"), list(record.get("messages", [])), voice,
                            record.get("updated_at", 0.0))

    def _save(self, conversation: Conversation) -> None:
        folder = self.root / conversation.id
        folder.mkdir(parents=True, exist_ok=True)
        voice_sha = hashlib.sha256(conversation.voice).hexdigest() if conversation.voice else None
        record_path = folder / RECORD_FILE
        try:
            stored_sha = json.loads(record_path.read_text(encoding="utf-8")).get("voice_sha256")
        except (OSError, ValueError):
            stored_sha = None
        if voice_sha is not None and voice_sha != stored_sha:  # the recording first, then the record naming it
            write_atomic(folder / VOICE_FILE, conversation.voice)
        record = {"id": conversation.id, "system_message": conversation.system_message,
                  "messages": conversation.messages, "voice_sha256": voice_sha, "updated_at": conversation.updated_at}
        write_atomic(record_path, json.dumps(record, ensure_ascii=False).encode("utf-8"))

    def _sweep(self) -> None:
        """Delete idle conversations (at most once a minute)."""
        now = time.time()
        if self.idle_expiry_s <= 0 or now - self._swept_at < 60 or not self.root.is_dir():
            return
        self._swept_at = now
        for record in self.root.glob(f"*/{RECORD_FILE}"):
            try:
                updated_at = json.loads(record.read_text(encoding="utf-8")).get("updated_at", 0.0)
            except (OSError, ValueError):
                continue
            if self._expired(updated_at):
                shutil.rmtree(record.parent, ignore_errors=True)
