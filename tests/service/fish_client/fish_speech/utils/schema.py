"""The request models of seed 001's tables (ServeTTSRequest, AsyncGenerateRequest, ...), as a client builds
them: pydantic models with the seed's defaults and ranges, sent with `ormsgpack.OPT_SERIALIZE_PYDANTIC`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

ChunkLength = Annotated[int, Field(ge=100, le=300, strict=True)]
TopP = Annotated[float, Field(ge=0.1, le=1.0, strict=True)]
RepetitionPenalty = Annotated[float, Field(ge=0.9, le=2.0, strict=True)]
Temperature = Annotated[float, Field(ge=0.1, le=1.0, strict=True)]
AudioFormat = Literal["wav", "pcm", "mp3"]


class ServeReferenceAudio(BaseModel):
    audio: bytes
    text: str


class ServeTTSRequest(BaseModel):
    text: str
    chunk_length: ChunkLength = 200
    format: AudioFormat = "wav"
    references: list[ServeReferenceAudio] = []
    reference_id: str | None = None
    seed: int | None = None
    use_memory_cache: Literal["on", "off"] = "off"
    normalize: bool = True
    streaming: bool = False
    max_new_tokens: int = 1024
    top_p: TopP = 0.8
    repetition_penalty: RepetitionPenalty = 1.1
    temperature: Temperature = 0.8


class AsyncGenerateRequest(BaseModel):
    step_id: str
    text: str
    chunk_length: ChunkLength = 200
    format: AudioFormat = "mp3"
    references: list[ServeReferenceAudio] = []
    reference_id: str | None = None
    seed: int | None = None
    use_memory_cache: Literal["on", "off"] = "off"
    normalize: bool = True
    max_new_tokens: int = 2048
    top_p: TopP = 0.8
    repetition_penalty: RepetitionPenalty = 1.1
    temperature: Temperature = 0.8


class ServeVQGANEncodeRequest(BaseModel):
    audios: list[bytes]


class ServeVQGANDecodeRequest(BaseModel):
    tokens: list[list[list[int]]]
