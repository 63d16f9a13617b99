"""One turn of the agent: the chat model writes the answer while the speech service speaks it.

Text deltas are cut into sentences by the live socket's `TextSegmenter`; each sentence is synthesized as soon as
it is complete (in order, one at a time, while the chat model goes on writing), so the first audio leaves after
the first sentence, not after the whole answer. `speak_answer` yields the text deltas and the audio chunks as
they are made; closing it (the client left) cancels the chat stream and the synthesis."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Union

import numpy as np

from cosyapp.agent.chat import ChatModel, Message
from cosyapp.server.request_log import RequestRecord
from cosyapp.server.text_segments import TextSegmenter
from cosyapp.server.speech import NoAudio, SpeechRequest, SpeechService, VoiceReference


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class AudioChunk:
    sentence: int  # index of the spoken sentence it belongs to
    samples: np.ndarray  # float32 mono at the backend's rate


Event = Union[TextDelta, AudioChunk]


@dataclass
class Answer:
    """What a turn made, filled in as its events pass."""

    text: str = ""
    sample_rate: int = 0
    sentences: list[list[np.ndarray]] = field(default_factory=list)  # audio chunks of each spoken sentence

    def sentence_audio(self) -> list[np.ndarray]:
        return [np.concatenate(chunks) for chunks in self.sentences if chunks]

    def audio(self) -> np.ndarray:
        parts = self.sentence_audio()
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class TurnPlan:
    messages: list[Message]
    temperature: float
    max_new_tokens: int
    voice: VoiceReference
    min_sentence_chars: int
    max_sentence_chars: int


class _Finished:
    pass


@dataclass(frozen=True)
class _Failed:
    error: BaseException


async def speak_answer(chat: ChatModel, speech: SpeechService, plan: TurnPlan, answer: Answer,
                       record: RequestRecord | None = None) -> AsyncIterator[Event]:
    """The turn's events in order of making (text deltas and audio chunks interleave; audio chunks are in order
    among themselves). `answer` collects the text and audio."""
    events: asyncio.Queue[Event | _Finished | _Failed] = asyncio.Queue()
    sentences: asyncio.Queue[str | None] = asyncio.Queue()

    async def write() -> None:
        segmenter = TextSegmenter(plan.min_sentence_chars, plan.max_sentence_chars)
        async with contextlib.aclosing(chat.stream(plan.messages, plan.temperature, plan.max_new_tokens)) as deltas:
            async for delta in deltas:
                answer.text += delta
                events.put_nowait(TextDelta(delta))
                for sentence in segmenter.add(delta):
                    sentences.put_nowait(sentence)
        for sentence in segmenter.flush():
            sentences.put_nowait(sentence)
        sentences.put_nowait(None)

    async def speak() -> None:
        while (sentence := await sentences.get()) is not None:
            try:
                synthesis = await speech.start(SpeechRequest(text=sentence, voice=plan.voice, stream=True), record)
            except NoAudio:
                continue  # nothing speakable in it (only punctuation, an emoji): on with the next
            answer.sample_rate = synthesis.sample_rate
            index = len(answer.sentences)
            answer.sentences.append([synthesis.first])
            events.put_nowait(AudioChunk(index, synthesis.first))
            try:
                async for chunk in synthesis.stream:
                    answer.sentences[index].append(chunk)
                    events.put_nowait(AudioChunk(index, chunk))
            finally:
                synthesis.stream.cancel()

    async def report(job: Callable[[], Awaitable[None]]) -> None:
        try:
            await job()
            events.put_nowait(_Finished())
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            events.put_nowait(_Failed(e))

    tasks = [asyncio.create_task(report(write)), asyncio.create_task(report(speak))]
    try:
        finished = 0
        while finished < len(tasks):
            event = await events.get()
            if isinstance(event, _Finished):
                finished += 1
            elif isinstance(event, _Failed):
                raise event.error
            else:
                yield event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
