"""Conversation memory: a conversation's system message, its last messages and its voice, by conversation_id.

`ConversationStore` is what the agent needs of a store. `DocumentConversationStore` keeps conversations as
documents of the service's store (cosyapp/storage: the local disk under `[storage] data_dir`, or a cluster's
shared store), so they survive restarts and every replica sees them: namespace `conversations` holds the system
message, the messages and when the conversation was last used; namespace `conversation_voices` the recording its
voice is cloned from (base64 WAV), written only when it changes. It is bounded: a conversation keeps its last
`max_messages` messages, and conversations idle for longer than `idle_expiry_s` are deleted."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from cosyapp.storage import DocumentStore
from cosyapp.storage.documents import DOCUMENT_KEY as CONVERSATION_ID  # conversation ids are document keys

log = logging.getLogger("cosyapp.agent")

__all__ = ["CONVERSATION_ID", "Conversation", "ConversationStore", "DocumentConversationStore"]

RECORDS, VOICES = "conversations", "conversation_voices"
SWEEP_EVERY_S = 60.0


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


def _sha256(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data else None


class DocumentConversationStore:
    def __init__(self, documents: DocumentStore, max_messages: int, idle_expiry_s: float) -> None:
        self.documents = documents
        self.max_messages = max_messages
        self.idle_expiry_s = idle_expiry_s
        self._swept_at = 0.0

    async def load(self, conversation_id: str) -> Conversation | None:
        return await asyncio.to_thread(self._load, conversation_id)

    async def save(self, conversation: Conversation) -> None:
        conversation.messages = conversation.messages[-self.max_messages:]
        conversation.updated_at = time.time()
        await asyncio.to_thread(self._save, conversation)

    def _expired(self, record: dict) -> bool:
        return self.idle_expiry_s > 0 and record.get("updated_at", 0.0) < time.time() - self.idle_expiry_s

    def _load(self, conversation_id: str) -> Conversation | None:
        self._sweep()
        record = self.documents.get(RECORDS, conversation_id)
        if not isinstance(record, dict):
            return None
        if self._expired(record):
            self._delete(conversation_id)
            return None
        voice = None
        if record.get("voice_sha256"):
            stored = self.documents.get(VOICES, conversation_id)
            voice = base64.b64decode(stored) if isinstance(stored, str) else None
        return Conversation(conversation_id, record.get("system_message"), list(record.get("messages", [])), voice,
                            record.get("updated_at", 0.0))

    def _save(self, conversation: Conversation) -> None:
        voice_sha = _sha256(conversation.voice)
        stored = self.documents.get(RECORDS, conversation.id)
        if voice_sha is not None and voice_sha != (stored or {}).get("voice_sha256"):
            # the recording first, then the record naming it
            self.documents.put(VOICES, conversation.id, base64.b64encode(conversation.voice).decode("ascii"))
        self.documents.put(RECORDS, conversation.id, {
            "system_message": conversation.system_message, "messages": conversation.messages,
            "voice_sha256": voice_sha, "updated_at": conversation.updated_at})

    def _delete(self, conversation_id: str) -> None:
        self.documents.delete(RECORDS, conversation_id)
        self.documents.delete(VOICES, conversation_id)

    def _sweep(self) -> None:
        """Delete idle conversations (at most once a minute)."""
        now = time.time()
        if self.idle_expiry_s <= 0 or now - self._swept_at < SWEEP_EVERY_S:
            return
        self._swept_at = now
        for conversation_id in self.documents.keys(RECORDS):
            record = self.documents.get(RECORDS, conversation_id)
            if isinstance(record, dict) and self._expired(record):
                self._delete(conversation_id)
