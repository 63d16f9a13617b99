"""The shared store of a cluster, in Redis: every replica reads and writes the same speakers, default prompt,
async tasks and documents.

Keys (all under `cosyapp:`):
    speakers                  hash  speaker id -> version (the registry's index)
    speaker:<id>              hash  meta (JSON), text, wav (16-bit WAV), version, features:<fingerprint> (torch.save)
    default_prompt            hash  the same fields, for `prompts set-default`
    version                   counter: every write of a voice takes the next number
    tasks                     set   step ids
    task:<id>                 hash  record (JSON), result (the audio file)
    task:<id>:lease           string that expires: the replica running the task renews it
    doc:<namespace>           hash  key -> JSON document

A voice's features are kept per model fingerprint: the first replica of a model that uses a voice registered by
another model computes them from the recording and stores them for the rest. Replicas cache prepared voices in
memory by (speaker id, version) and read the version on every request (one small read), so a voice that was
replaced or removed through another replica is never served stale. Changes that touch several keys run in
optimistic transactions (WATCH/MULTI), so concurrent replicas cannot register the same id twice.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
import torch

from cosyapp.audio import decode_audio
from cosyapp.engine.types import InputError
from cosyapp.storage import Store
from cosyapp.storage.documents import check_document_key
from cosyapp.storage.tasks import Task
from cosyapp.voices import VoiceFiles, validate_speaker_id

PREFIX = "cosyapp:"
SPEAKERS = PREFIX + "speakers"
DEFAULT_PROMPT = PREFIX + "default_prompt"
VERSION = PREFIX + "version"
TASKS = PREFIX + "tasks"


def _speaker_key(speaker_id: str) -> str:
    return f"{PREFIX}speaker:{speaker_id}"


def _features_field(fingerprint: str) -> str:
    return f"features:{fingerprint}"


def _voice_fields(files: VoiceFiles, version: int) -> dict[str, bytes | str | int]:
    features = io.BytesIO()
    torch.save(files.features, features)
    return {"meta": json.dumps(files.meta, ensure_ascii=False), "text": files.text or "", "wav": files.wav,
            "version": version, _features_field(files.meta["features_for"]): features.getvalue()}


@dataclass(frozen=True)
class RedisStoredVoice:
    """A voice in the shared store, as `voices.load_voice` reads it (the recording and features are fetched only
    when a replica prepares the voice, not on every request)."""

    client: redis.Redis = field(repr=False)
    redis_key: str
    id: str
    version: int
    text: str | None
    meta: dict[str, Any]

    @property
    def key(self) -> str:
        return f"redis:{self.redis_key}"

    @property
    def path(self) -> str:
        """Where it is stored, as the CLI shows it."""
        return f"the shared store's key {self.redis_key}"

    @property
    def wav_path(self) -> str:
        return f"{self.path} (field wav)"

    def features_for(self, fingerprint: str) -> dict[str, Any] | None:
        data = self.client.hget(self.redis_key, _features_field(fingerprint))
        if data is None:
            return None
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:  # unreadable features: the recording is the source of truth
            return None

    def recording(self) -> tuple[np.ndarray, int]:
        data = self.client.hget(self.redis_key, "wav")
        if data is None:
            raise InputError(f"speaker {self.id!r} was removed meanwhile")
        return decode_audio(data, f"{self.id}/prompt.wav")

    def keep_features(self, fingerprint: str, state: dict[str, Any]) -> None:
        """Store features recomputed for this model, unless the voice changed meanwhile."""
        features = io.BytesIO()
        torch.save(state, features)

        def store(pipe: redis.client.Pipeline) -> None:
            if int(pipe.hget(self.redis_key, "version") or -1) != self.version:
                return
            pipe.multi()
            pipe.hset(self.redis_key, _features_field(fingerprint), features.getvalue())

        self.client.transaction(store, self.redis_key)


def _read_voice(client: redis.Redis, redis_key: str, voice_id: str) -> RedisStoredVoice | None:
    meta, text, version = client.hmget(redis_key, ["meta", "text", "version"])
    if meta is None or version is None:
        return None
    return RedisStoredVoice(client, redis_key, voice_id, int(version), text.decode("utf-8") or None,
                            json.loads(meta))


class RedisSpeakers:
    """The speaker registry in the shared store (the same methods and errors as `voices.SpeakerRegistry`)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.root = f"the shared store's hash {SPEAKERS}"  # where, as the CLI shows it

    def ids(self) -> list[str]:
        return sorted(name.decode("utf-8") for name in self.client.hkeys(SPEAKERS))

    def get(self, speaker_id: str) -> RedisStoredVoice:
        stored = _read_voice(self.client, _speaker_key(validate_speaker_id(speaker_id)), speaker_id)
        if stored is None:
            # The other ids are not listed: they may be other clients' voices.
            raise InputError(f"unknown speaker {speaker_id!r}")
        return stored

    def add(self, speaker_id: str, files: VoiceFiles) -> RedisStoredVoice:
        key = _speaker_key(validate_speaker_id(speaker_id))
        version = self.client.incr(VERSION)

        def write(pipe: redis.client.Pipeline) -> None:
            if pipe.hexists(SPEAKERS, speaker_id):
                raise InputError(f"speaker {speaker_id!r} already exists; remove it first")
            pipe.multi()
            pipe.delete(key)
            pipe.hset(key, mapping=_voice_fields(files, version))
            pipe.hset(SPEAKERS, speaker_id, version)

        self.client.transaction(write, SPEAKERS)
        return self.get(speaker_id)

    def remove(self, speaker_id: str) -> None:
        self.get(speaker_id)  # InputError when unknown

        def delete(pipe: redis.client.Pipeline) -> None:
            pipe.multi()
            pipe.delete(_speaker_key(speaker_id))
            pipe.hdel(SPEAKERS, speaker_id)

        self.client.transaction(delete, SPEAKERS)

    def rename(self, old_id: str, new_id: str) -> RedisStoredVoice:
        self.get(old_id)
        validate_speaker_id(new_id)
        version = self.client.incr(VERSION)

        def move(pipe: redis.client.Pipeline) -> None:
            if pipe.hexists(SPEAKERS, new_id):
                raise InputError(f"speaker {new_id!r} already exists")
            if not pipe.hexists(SPEAKERS, old_id):
                raise InputError(f"cannot rename {old_id!r} to {new_id!r}: it was removed meanwhile")
            pipe.multi()
            pipe.rename(_speaker_key(old_id), _speaker_key(new_id))
            pipe.hset(_speaker_key(new_id), "version", version)
            pipe.hdel(SPEAKERS, old_id)
            pipe.hset(SPEAKERS, new_id, version)

        self.client.transaction(move, SPEAKERS)
        return self.get(new_id)


class RedisDefaultPrompt:
    """The default prompt override in the shared store (the methods of `voices.DefaultPromptStore`)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def get(self) -> RedisStoredVoice | None:
        return _read_voice(self.client, DEFAULT_PROMPT, "default_prompt")

    def set(self, files: VoiceFiles) -> RedisStoredVoice:
        fields = _voice_fields(files, self.client.incr(VERSION))
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(DEFAULT_PROMPT)
            pipe.hset(DEFAULT_PROMPT, mapping=fields)
            pipe.execute()
        return self.get()

    def clear(self) -> bool:
        return bool(self.client.delete(DEFAULT_PROMPT))


class RedisTasks:
    """Async task records and results in the shared store, with leases (see cosyapp/server/fish_tasks.py)."""

    leases = True

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @staticmethod
    def _key(step_id: str) -> str:
        return f"{PREFIX}task:{step_id}"

    def tasks(self) -> list[Task]:
        step_ids = sorted(self.client.smembers(TASKS))
        with self.client.pipeline(transaction=False) as pipe:
            for step_id in step_ids:
                pipe.hget(self._key(step_id.decode("utf-8")), "record")
            records = pipe.execute()
        return [Task.from_json(record) for record in records if record is not None]

    def load(self, step_id: str) -> Task | None:
        record = self.client.hget(self._key(step_id), "record")
        return None if record is None else Task.from_json(record)

    def save(self, task: Task) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(task.step_id), "record", task.to_json())
            pipe.sadd(TASKS, task.step_id)
            pipe.execute()

    def finish(self, task: Task) -> bool:
        """Save `task` (now finished) unless its stored record has finished already (atomically)."""
        key = self._key(task.step_id)

        def write(pipe: redis.client.Pipeline) -> bool:
            record = pipe.hget(key, "record")
            if record is not None and Task.from_json(record).finished:
                return False
            pipe.multi()
            pipe.hset(key, "record", task.to_json())
            pipe.sadd(TASKS, task.step_id)
            return True

        return self.client.transaction(write, key, value_from_callable=True)

    def delete(self, step_id: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(step_id), f"{self._key(step_id)}:lease")
            pipe.srem(TASKS, step_id)
            pipe.execute()

    def write_result(self, task: Task, data: bytes) -> None:
        self.client.hset(self._key(task.step_id), "result", data)

    def read_result(self, task: Task) -> bytes | None:
        return self.client.hget(self._key(task.step_id), "result")

    def renew(self, step_id: str, seconds: float) -> None:
        self.client.set(f"{self._key(step_id)}:lease", b"1", px=max(1, int(seconds * 1000)))

    def alive(self, step_id: str) -> bool:
        return bool(self.client.exists(f"{self._key(step_id)}:lease"))

    def release(self, step_id: str) -> None:
        self.client.delete(f"{self._key(step_id)}:lease")


class RedisDocuments:
    """JSON documents by namespace and key (the methods of `documents.DiskDocuments`)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @staticmethod
    def _key(namespace: str) -> str:
        return f"{PREFIX}doc:{check_document_key('namespace', namespace)}"

    def get(self, namespace: str, key: str) -> Any | None:
        data = self.client.hget(self._key(namespace), check_document_key("key", key))
        return None if data is None else json.loads(data)

    def put(self, namespace: str, key: str, document: Any) -> None:
        self.client.hset(self._key(namespace), check_document_key("key", key),
                         json.dumps(document, ensure_ascii=False))

    def delete(self, namespace: str, key: str) -> bool:
        return bool(self.client.hdel(self._key(namespace), check_document_key("key", key)))

    def keys(self, namespace: str) -> list[str]:
        return sorted(name.decode("utf-8") for name in self.client.hkeys(self._key(namespace)))


def open_redis_store(url: str) -> Store:
    """The shared store at `url` (redis://host:port/db); raises ConnectionError when it cannot be reached."""
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
    try:
        client.ping()
    except redis.RedisError as e:
        raise ConnectionError(f"[storage] shared_store {url}: cannot reach Redis: {e}") from None
    return Store(speakers=RedisSpeakers(client), default_prompt=RedisDefaultPrompt(client),
                 tasks=RedisTasks(client), documents=RedisDocuments(client), shared=True)
