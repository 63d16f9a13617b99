"""The voice agent in-process, with a fake chat model and a fake speech service: sentences are spoken while the
answer is still being written, a conversation keeps its voice across turns and restarts, and the conversation
store and the job registry keep their bounds."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from cosyapp.agent.conversations import Conversation, DocumentConversationStore
from cosyapp.agent.jobs import CANCELLED, COMPLETED, IN_QUEUE, JobRegistry
from cosyapp.agent.service import AgentInput, AgentService
from cosyapp.agent.turn import Answer, AudioChunk, TextDelta, TurnPlan, speak_answer
from cosyapp.config import Settings
from cosyapp.server.request_log import RequestRecord
from cosyapp.server.speech import SpeechRequest, VoiceReference
from cosyapp.storage.documents import DiskDocuments

RATE = 16000


class FakeStream:
    def __init__(self, chunks: list[np.ndarray]) -> None:
        self.chunks = chunks
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> np.ndarray:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class FakeSpeech:
    """Speaks each sentence as two chunks of 0.1 s; remembers what it was asked."""

    def __init__(self) -> None:
        self.requests: list[SpeechRequest] = []
        self.started = asyncio.Event()

    def record(self, label: str | None = None) -> RequestRecord:
        return RequestRecord("test", None, label)

    async def start(self, request: SpeechRequest, record=None):
        self.requests.append(request)
        self.started.set()
        chunk = np.full(RATE // 10, 0.1, dtype=np.float32)
        return type("Speech", (), {"first": chunk, "stream": FakeStream([chunk.copy()]), "sample_rate": RATE})()


class FakeChat:
    """Streams `pieces`; waits for `gate` (if any) before the piece at `gate_at`."""

    def __init__(self, pieces: list[str], gate: asyncio.Event | None = None, gate_at: int = 0) -> None:
        self.pieces, self.gate, self.gate_at = pieces, gate, gate_at
        self.sent: list[list[dict]] = []

    async def stream(self, messages, temperature, max_new_tokens):
        self.sent.append(messages)
        for index, piece in enumerate(self.pieces):
            if self.gate is not None and index == self.gate_at:
                await self.gate.wait()
            yield piece

    async def close(self) -> None:
        pass


def test_first_sentence_is_spoken_before_the_answer_is_written():
    async def scenario() -> list:
        speech = FakeSpeech()
        # The chat model writes its second sentence only once the first one is being spoken: the turn can end
        # only if synthesis starts while the answer is still being written.
        chat = FakeChat(["Hello there, friend. ", "Here is more text. ", "Bye now."], gate=speech.started, gate_at=2)
        plan = TurnPlan([{"role": "user", "content": "hi"}], 0.7, 50, VoiceReference(), 10, 200)
        answer = Answer()
        events = [event async for event in speak_answer(chat, speech, plan, answer)]
        assert answer.text == "Hello there, friend. Here is more text. Bye now."
        assert [request.text for request in speech.requests] == ["Hello there, friend.", "Here is more text.",
                                                                "Bye now."]
        return events

    events = asyncio.run(asyncio.wait_for(scenario(), 10))
    kinds = [type(event) for event in events]
    assert kinds.index(AudioChunk) < len(kinds) - 1 - kinds[::-1].index(TextDelta)  # audio before the last text
    assert [event.sentence for event in events if isinstance(event, AudioChunk)] == [0, 0, 1, 1, 2, 2]


def agent(tmp_path: Path, chat: FakeChat, speech: FakeSpeech) -> AgentService:
    store = DocumentConversationStore(DiskDocuments(tmp_path), max_messages=20, idle_expiry_s=3600)
    return AgentService(Settings(), speech, chat=chat, store=store)  # type: ignore[arg-type]


async def answered(service: AgentService, request: AgentInput) -> dict:
    job = service.submit(request)
    await job.wait(10)
    assert job.status == COMPLETED, job.error
    return job.output


def test_conversation_keeps_its_voice_and_history_across_a_restart(tmp_path: Path):
    voice = b"RIFF-recording-bytes"
    speech, chat = FakeSpeech(), FakeChat(["Fine, thanks."])
    first = AgentInput("How are you?", system_message="Be brief", system_audio=voice, conversation_id="c1")

    async def turns() -> None:
        await answered(agent(tmp_path, chat, speech), first)
        await answered(agent(tmp_path, chat, speech), replace(first, message="Sure?", system_audio=None,
                                                               system_message=None))

    asyncio.run(turns())
    voices = [request.voice for request in speech.requests]
    assert len(voices) == 2 and voices[0] == voices[1] and voices[0].recordings[0].audio == voice
    assert chat.sent[1] == [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "How are you?"},
                            {"role": "assistant", "content": "Fine, thanks."}, {"role": "user", "content": "Sure?"}]


def test_one_off_turn_uses_the_default_voice_and_keeps_nothing(tmp_path: Path):
    speech, chat = FakeSpeech(), FakeChat(["Hi."])
    output = asyncio.run(answered(agent(tmp_path, chat, speech), AgentInput("Hello")))
    assert speech.requests[0].voice.default
    assert [m["role"] for m in output["history"]] == ["user", "assistant"]
    assert DiskDocuments(tmp_path).keys("conversations") == []


def test_store_keeps_the_last_messages_and_forgets_idle_conversations(tmp_path: Path):
    documents = DiskDocuments(tmp_path)
    store = DocumentConversationStore(documents, max_messages=4, idle_expiry_s=3600)
    messages = [{"role": "user", "content": str(n)} for n in range(6)]

    async def scenario() -> None:
        await store.save(Conversation("a", "sys", list(messages), b"wav"))
        loaded = await store.load("a")
        assert loaded.messages == messages[-4:] and loaded.voice == b"wav" and loaded.system_message == "sys"
        stored = documents.get("conversations", "a")
        documents.put("conversations", "a", {**stored, "updated_at": time.time() - 7200})  # idle for two hours
        assert await store.load("a") is None
        assert documents.get("conversations", "a") is None and documents.get("conversation_voices", "a") is None

    asyncio.run(scenario())


def test_job_registry_cancels_and_keeps_at_most_max_jobs():
    async def scenario() -> None:
        registry = JobRegistry(keep_s=3600, max_jobs=3)
        jobs = [registry.new() for _ in range(3)]
        assert jobs[0].status == IN_QUEUE
        jobs[0].task = asyncio.create_task(asyncio.sleep(60))
        assert registry.cancel(jobs[0]) and not registry.cancel(jobs[0])
        await asyncio.sleep(0)
        assert jobs[0].task.cancelled() and jobs[0].status == CANCELLED
        for job in jobs[1:]:
            job.finish(COMPLETED, {"text": "x"})
        registry.new()  # one too many: the oldest finished job goes
        assert registry.get(jobs[0].id) is None and registry.get(jobs[2].id) is jobs[2]

    asyncio.run(scenario())


def test_job_follow_sees_every_chunk_in_order():
    async def scenario() -> list:
        job = JobRegistry(60, 10).new()

        async def produce() -> None:
            for n in range(5):
                job.add({"n": n})
                await asyncio.sleep(0.01)
            job.finish(COMPLETED, {})

        producer = asyncio.create_task(produce())
        seen = [chunk["n"] async for chunk in job.follow()]
        await producer
        return seen

    started = time.monotonic()
    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4] and time.monotonic() - started < 5
