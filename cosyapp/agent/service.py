"""The agent service: turns a parsed request into a job that answers it (see `turn.py`), with the
conversation's memory and voice, and the answer document of the seed (`output`)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np

from cosyapp.agent.chat import ChatModel, Message, make_chat
from cosyapp.agent.conversations import Conversation, ConversationStore, DocumentConversationStore
from cosyapp.agent.jobs import COMPLETED, FAILED, Job, JobError, JobRegistry
from cosyapp.agent.turn import Answer, AudioChunk, TextDelta, TurnPlan, speak_answer
from cosyapp.audio import encode_audio, wav_bytes
from cosyapp.config import Settings
from cosyapp.engine.types import InputError
from cosyapp.server.errors import as_api_error
from cosyapp.server.request_log import RequestRecord
from cosyapp.server.speech import Recording, SpeechService, VoiceReference

log = logging.getLogger("cosyapp.agent")

# Samples per streamed audio event at most (5.5 KiB of base64): the seed's JavaScript example parses every piece
# of the body it receives as one whole event, which holds for small events while the client keeps up.
AUDIO_EVENT_SAMPLES = 2048


@dataclass(frozen=True)
class AgentInput:
    """A request's `input`, checked (routes/agent.py parses it)."""

    message: str
    system_message: str | None = None
    system_audio: bytes | None = None  # a WAV of the recording to clone (already checked and trimmed)
    conversation_id: str | None = None
    streaming: bool = True
    format: str = "wav"
    temperature: float = 0.7
    max_new_tokens: int = 512


def audio_chunk_content(samples: np.ndarray, sample_rate: int) -> str:
    """A streamed audio chunk: base64 of a complete WAV file of its samples (each one playable alone)."""
    return base64.b64encode(wav_bytes(samples, sample_rate)).decode("ascii")


class AgentService:
    def __init__(self, settings: Settings, speech: SpeechService, chat: ChatModel | None = None,
                 store: ConversationStore | None = None) -> None:
        agent = settings.agent
        self.settings = agent
        self.speech = speech
        self._chat = chat
        self.store = store or DocumentConversationStore(speech.state.store.documents, agent.max_turns,
                                                        agent.idle_expiry_hours * 3600)
        self.jobs = JobRegistry(agent.keep_jobs_minutes * 60, agent.max_jobs)
        self._slots = asyncio.Semaphore(agent.max_concurrent)
        self._conversation_locks: dict[str, asyncio.Lock] = {}
        self._lock_users: Counter[str] = Counter()

    @property
    def chat(self) -> ChatModel:
        if self._chat is None:
            self._chat = make_chat(self.settings)
        return self._chat

    def submit(self, request: AgentInput) -> Job:
        """A new job answering `request`, started at once (it waits IN_QUEUE for a turn slot)."""
        job = self.jobs.new()
        job.task = asyncio.create_task(self._run(job, request), name=f"agent-{job.id}")
        return job

    async def close(self) -> None:
        await self.jobs.close()
        if self._chat is not None:
            await self._chat.close()

    async def _run(self, job: Job, request: AgentInput) -> None:
        record = self.speech.record("agent")
        try:
            async with self._slots, self._conversation(request.conversation_id):
                job.start()
                output = await self._answer(job, request, record)
            job.finish(COMPLETED, output)
            record.finish(200, "ok")
        except asyncio.CancelledError:
            record.finish(499, "cancelled")
        except Exception as e:
            error = as_api_error(e)
            if error is None:
                log.error("agent job %s failed", job.id, exc_info=e)
                job.finish(FAILED, error=JobError("internal error; see the service log", 500,
                                                  f"reference {job.id}: the details are in the service log"))
                record.finish(500, f"error({type(e).__name__})")
            else:
                job.finish(FAILED, error=JobError(error.detail, error.status_code, f"reference {job.id}"))
                record.finish(error.status_code, f"failed({error.detail})")

    async def _answer(self, job: Job, request: AgentInput, record: RequestRecord) -> dict[str, Any]:
        conversation = await self._conversation_of(request)
        voice = VoiceReference(recordings=(Recording(conversation.voice, "system_audio"),)) if conversation.voice \
            else VoiceReference()
        plan = TurnPlan(self.messages(conversation, request.message), request.temperature, request.max_new_tokens,
                        voice, self.settings.min_sentence_chars, self.settings.max_sentence_chars)
        answer = Answer()
        record.text_chars = len(request.message)
        async with contextlib.aclosing(speak_answer(self.chat, self.speech, plan, answer, record)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    job.add({"type": "text", "content": event.text})
                elif isinstance(event, AudioChunk):
                    record.audio_samples += event.samples.shape[0]
                    for start in range(0, event.samples.shape[0], AUDIO_EVENT_SAMPLES):
                        piece = event.samples[start:start + AUDIO_EVENT_SAMPLES]
                        job.add({"type": "audio", "content": audio_chunk_content(piece, answer.sample_rate),
                                 "sentence": event.sentence})
        audio = answer.audio()
        audio_s = audio.shape[0] / answer.sample_rate if answer.sample_rate else 0.0
        conversation.messages += [{"role": "user", "content": request.message},
                                  {"role": "assistant", "content": answer.text, "audio_s": round(audio_s, 2)}]
        if conversation.id:
            await self.store.save(conversation)
        sample_rate = answer.sample_rate or self.speech.state.ready_engine(None).info.sample_rate
        encoded = await asyncio.to_thread(encode_audio, audio, sample_rate, request.format) if audio.size else b""
        return {
            "text": answer.text,
            "audio_base64": base64.b64encode(encoded).decode("ascii"),
            "audio_format": request.format,
            "sample_rate": sample_rate,
            "history": self.history(conversation),
            "vq_codes": await self.answer_codes(answer) if not request.streaming else [],
        }

    async def _conversation_of(self, request: AgentInput) -> Conversation:
        conversation = None
        if request.conversation_id is not None:
            conversation = await self.store.load(request.conversation_id)
        conversation = conversation or Conversation(request.conversation_id or "")  # "": a one-off turn, not kept
        if request.system_message is not None:
            conversation.system_message = request.system_message
        if request.system_audio is not None:
            conversation.voice = request.system_audio
        return conversation

    @staticmethod
    def messages(conversation: Conversation, message: str) -> list[Message]:
        """What the chat model is sent: the system message, the kept messages, the new user message."""
        system = [{"role": "system", "content": conversation.system_message}] if conversation.system_message else []
        kept = [{"role": m["role"], "content": m["content"]} for m in conversation.messages]
        return [*system, *kept, {"role": "user", "content": message}]

    @staticmethod
    def history(conversation: Conversation) -> list[Message]:
        """The seed's `history`: the messages, an assistant's with the length of its speech."""
        system = [{"role": "system", "content": conversation.system_message}] if conversation.system_message else []
        return [*system, *({"role": m["role"], "content": m["content"] + (
            f" <audio {m['audio_s']:.1f}s>" if m["role"] == "assistant" else "")} for m in conversation.messages)]

    async def answer_codes(self, answer: Answer) -> list[list[int]]:
        """The spoken answer as the backend's tokens: codec codes `[codebooks][frames]` (Fish), or speech tokens
        `[1][tokens]` (CosyVoice), one sentence after another; computed in an engine slot."""
        sentences = answer.sentence_audio()
        if not sentences:
            return []
        engine = self.speech.state.ready_engine(None)
        backend, info, sample_rate = engine.backend, engine.info, answer.sample_rate

        def tokens_of(audio: np.ndarray) -> np.ndarray | None:
            if info.codec_codebooks:
                return np.asarray(backend.encode_codes(audio, sample_rate))  # type: ignore[attr-defined]
            state = backend.voice_state(backend.prepare_voice(audio, sample_rate))
            tokens = state.get("speech_token")
            return None if tokens is None else np.asarray(tokens).reshape(1, -1)

        def work() -> list[list[int]]:
            grids = []
            for audio in sentences:
                try:
                    grid = tokens_of(audio)
                except InputError:  # too short to tokenize
                    continue
                if grid is not None:
                    grids.append(grid)
            return np.concatenate(grids, axis=1).tolist() if grids else []

        return await engine.run(work, engine.admit())

    @contextlib.asynccontextmanager
    async def _conversation(self, conversation_id: str | None) -> AsyncIterator[None]:
        """Turns of one conversation run one after another (each sees the one before)."""
        if conversation_id is None:
            yield
            return
        self._lock_users[conversation_id] += 1
        lock = self._conversation_locks.setdefault(conversation_id, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            self._lock_users[conversation_id] -= 1
            if not self._lock_users[conversation_id]:
                del self._lock_users[conversation_id], self._conversation_locks[conversation_id]
