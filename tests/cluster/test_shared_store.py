"""The shared store (Redis, for real) against the interface the local disk implements: speakers seen by every
replica at once, features kept per model, task leases that fail the tasks of a dead replica, documents."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch

from cosyapp.audio import read_audio_file
from cosyapp.config import StorageSettings
from cosyapp.engine.types import InputError
from cosyapp.server.fish_tasks import INTERRUPTED, TaskManager
from cosyapp.storage import open_store
from cosyapp.voices import features_fingerprint, load_voice, make_voice_files

pytest.importorskip("redis", reason="the Redis client is not installed (pip install -e '.[cluster]')")

PROMPT = Path(__file__).resolve().parents[2] / "asset" / "zero_shot_prompt.wav"


@pytest.fixture
def replicas(redis_url: str):
    """Two replicas' views of one freshly emptied shared store."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    settings = StorageSettings(shared_store=redis_url)
    return open_store(settings), open_store(settings)


@pytest.fixture(scope="module")
def backend(tiny_cosyvoice2_dir: Path):
    from cosyapp.engine.registry import load_backend

    return load_backend("cosyvoice2", tiny_cosyvoice2_dir, device="cpu")


def test_a_voice_registered_by_one_replica_is_used_by_the_other(replicas, backend, monkeypatch):
    first, second = replicas
    samples, rate = read_audio_file(PROMPT)
    files = make_voice_files(backend, samples, rate, "欢迎光临", {"source_file": "p.wav"})
    added = first.speakers.add("clerk", files)
    seen = second.speakers.get("clerk")
    assert second.speakers.ids() == ["clerk"] and seen.version == added.version and seen.text == "欢迎光临"
    with pytest.raises(InputError, match="already exists"):
        second.speakers.add("clerk", files)

    # The features stored by the first replica's model are used as they are: no prompt extraction.
    def no_extraction(*args, **kwargs):
        raise AssertionError("prompt features were recomputed")

    with monkeypatch.context() as patch:
        patch.setattr(backend, "prepare_voice", no_extraction)
        voice = load_voice(seen, backend)
    assert torch.equal(backend.voice_state(voice)["speech_token"], files.features["speech_token"])

    # Another model computes them from the recording once and keeps them for the next replica of that model.
    other_model = dataclasses.replace(backend.info(), model_dir="/elsewhere")
    monkeypatch.setattr(backend, "info", lambda: other_model)
    assert seen.features_for(features_fingerprint(backend)) is None
    load_voice(seen, backend)
    kept = first.speakers.get("clerk").features_for(features_fingerprint(backend))
    assert torch.equal(kept["speech_token"], files.features["speech_token"])

    # A replaced voice gets a new version (prepared-voice caches key on it); a removed one is gone for both.
    renamed = second.speakers.rename("clerk", "host")
    assert first.speakers.ids() == ["host"] and renamed.version != added.version
    first.speakers.remove("host")
    with pytest.raises(InputError, match="unknown speaker 'host'"):
        second.speakers.get("host")


def test_default_prompt_is_shared(replicas, backend):
    first, second = replicas
    samples, rate = read_audio_file(PROMPT)
    assert second.default_prompt.get() is None
    stored = first.default_prompt.set(make_voice_files(backend, samples, rate, None, {"instruction": "x"}))
    shared = second.default_prompt.get()
    assert shared.version == stored.version and shared.meta["instruction"] == "x"
    assert second.default_prompt.clear() and first.default_prompt.get() is None and not first.default_prompt.clear()


async def _until(check, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


def test_tasks_are_answered_by_any_replica_and_a_dead_replicas_task_fails(replicas):
    first, second = replicas

    async def scenario() -> None:
        runner = TaskManager(first.tasks, lease_s=0.3)
        reader = TaskManager(second.tasks, lease_s=0.3)

        async def finishes(started) -> bytes:
            started()
            return b"audio bytes"

        async def hangs(started) -> bytes:
            started()
            await asyncio.sleep(60)
            return b"never"

        runner.start("done", "wav", finishes, abandon=lambda: None)
        await _until(lambda: reader.get("done").status == "completed")
        assert reader.result(reader.get("done")) == b"audio bytes"

        # Stopped through the other replica: recorded at once, and its own runner cancels the job.
        runner.start("stopped", "wav", hangs, abandon=lambda: None)
        await _until(lambda: reader.get("stopped").status == "processing")
        assert reader.stop("stopped") and runner.get("stopped").status == "cancelled"
        await _until(lambda: "stopped" not in runner._jobs)

        # Still running while its lease is renewed, well past the lease's length ...
        runner.start("orphan", "mp3", hangs, abandon=lambda: None)
        await asyncio.sleep(1.0)
        assert reader.get("orphan").status == "processing"
        # ... and failed once its replica stops renewing it (dies without finishing it).
        runner._renewals.cancel()
        runner._jobs["orphan"].cancel()
        await _until(lambda: reader.get("orphan").status == "failed")
        assert reader.get("orphan").error == INTERRUPTED
        await reader.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("where", ["disk", "redis"])
def test_documents(where: str, redis_url: str, tmp_path: Path):
    settings = StorageSettings(data_dir=tmp_path, shared_store=redis_url if where == "redis" else "")
    documents = open_store(settings).documents
    for key in documents.keys("conversations"):
        documents.delete("conversations", key)
    assert documents.get("conversations", "c1") is None
    documents.put("conversations", "c1", {"turns": [{"role": "user", "text": "你好"}]})
    documents.put("conversations", "c0", [])
    assert documents.keys("conversations") == ["c0", "c1"]
    assert open_store(settings).documents.get("conversations", "c1")["turns"][0]["text"] == "你好"
    assert documents.delete("conversations", "c0") and not documents.delete("conversations", "c0")
    with pytest.raises(InputError, match="invalid key"):
        documents.put("conversations", "../x", {})
