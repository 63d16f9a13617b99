"""Issue 4, acceptance 3: the async task endpoints on a real uvicorn.

A stopped task reports `cancelled` and frees its slot (running or still queued); a completed task survives a
restart of the service (its download still works) while one cut off by the restart reports `failed`.

The model is the tiny Fish model with its end-of-speech token made unreachable, so a generation runs to the
end of its budget (thousands of frames with max_new_tokens=0): a task is reliably still running when stopped.
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import httpx
import ormsgpack
import pytest
import soundfile
import torch

from fish_service import fish_env, running_service, wait_for_status
from service_live import free_port

FRAME = 2048  # samples per codec frame


@pytest.fixture(scope="module")
def endless_model_dir(tiny_fish_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cosyapp.backends.fish.tokenizer import FishTokenizer

    out = tmp_path_factory.mktemp("fish_endless")
    for path in tiny_fish_dir.iterdir():
        shutil.copyfile(path, out / path.name)
    state = torch.load(out / "model.pth", map_location="cpu", weights_only=True)
    weight = state["output.weight"] * 100  # sharp logits: top-p keeps only the best few tokens ...
    weight[FishTokenizer.from_model_dir(out).im_end_id] = 0  # ... and <|im_end|> scores 0, far below them
    state["output.weight"] = weight
    torch.save(state, out / "model.pth")
    return out


@pytest.fixture(scope="module")
def service(endless_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One synthesis slot and one queue place (no API key: auth is covered by test_fish_api.py)."""
    workdir = tmp_path_factory.mktemp("fish_tasks")
    env = fish_env(free_port(), endless_model_dir, workdir / "data", COSYAPP_ENGINE_MAX_CONCURRENT="1",
                   COSYAPP_ENGINE_MAX_QUEUE="1")
    with running_service(workdir, env) as live:
        yield live


def create(url: str, step_id: str, **fields) -> httpx.Response:
    """AsyncGenerateRequest as msgpack, like the seed's example."""
    body = {"step_id": step_id, "text": "A long story about the sea.", "seed": 1, **fields}
    return httpx.post(f"{url}/generate_audio_enhanced_async", params={"format": "msgpack"},
                      content=ormsgpack.packb(body), headers={"content-type": "application/msgpack"}, timeout=30)


def wait_idle(service, timeout_s: float = 30.0) -> dict:
    """Engine counters once no request holds a slot or a queue place."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = service.stats()
        if (stats["active"] == 0 and stats["in_flight"] == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def test_stopped_tasks_are_cancelled_and_free_their_slots(service):
    url = service.url
    wait_idle(service)
    created = create(url, "long", max_new_tokens=0)  # up to the model's whole context
    assert created.status_code == 200
    assert ormsgpack.unpackb(created.content) == {"success": True, "message": "Task created and started",
                                                  "step_id": "long", "status": "pending"}
    assert wait_for_status(url, "long", {"processing"})["status"] == "processing"
    assert create(url, "queued", max_new_tokens=8).status_code == 200  # waits for the slot
    assert httpx.get(f"{url}/get_task_status/queued").json()["status"] == "pending"
    busy = create(url, "third", max_new_tokens=8)
    assert busy.status_code == 503 and "retry-after" in busy.headers  # slot and queue place taken
    assert create(url, "long", max_new_tokens=8).status_code == 409  # still running
    assert httpx.get(f"{url}/download_result/long").status_code == 400  # not completed

    for step_id in ("queued", "long"):
        stopped = httpx.post(f"{url}/stop_async_task/{step_id}").json()
        assert stopped == {"success": True, "message": f"Task {step_id} stopped", "step_id": step_id,
                           "status": "cancelled"}
        status = httpx.get(f"{url}/get_task_status/{step_id}").json()
        assert status["status"] == "cancelled" and status["download_url"] is None
        assert status["completed_at"] >= status["created_at"]
    stats = wait_idle(service)
    assert stats["active"] == 0 and stats["in_flight"] == 0 and stats["cancelled"] >= 1
    assert httpx.get(f"{url}/get_task_status/queued").json()["started_at"] is None  # never got the slot
    assert httpx.post(f"{url}/stop_async_task/long").json()["success"] is False  # already cancelled
    assert httpx.get(f"{url}/download_result/long").status_code == 400

    # The freed slot serves the next task.
    assert create(url, "short", max_new_tokens=8, format="wav").status_code == 200
    assert wait_for_status(url, "short", {"completed", "failed"})["status"] == "completed"
    download = httpx.get(f"{url}/download_result/short")
    assert download.status_code == 200 and download.headers["content-type"] == "audio/wav"
    samples, rate = soundfile.read(io.BytesIO(download.content))
    assert rate == 44100 and samples.shape == (7 * FRAME,)  # 8 frames generated, the last one dropped (S1)


def test_stop_generation_stops_every_task(service):
    url = service.url
    wait_idle(service)
    assert create(url, "all_1", max_new_tokens=0).status_code == 200
    assert create(url, "all_2", max_new_tokens=0).status_code == 200
    assert wait_for_status(url, "all_1", {"processing"})["status"] == "processing"
    answer = httpx.post(f"{url}/stop_generation")
    assert answer.json() == {"success": True, "message": "Stopped 2 task(s)"}
    for step_id in ("all_1", "all_2"):
        assert httpx.get(f"{url}/get_task_status/{step_id}").json()["status"] == "cancelled"
    assert wait_idle(service)["in_flight"] == 0


def test_finished_step_id_can_be_reused(service):
    url = service.url
    wait_idle(service)
    for audio_format in ("mp3", "pcm"):
        assert create(url, "again", max_new_tokens=4, format=audio_format).status_code == 200
        assert wait_for_status(url, "again", {"completed", "failed"})["status"] == "completed"
        download = httpx.get(f"{url}/download_result/again")
        assert download.headers["content-disposition"] == f'attachment; filename="again.{audio_format}"'
    assert len(download.content) == 3 * FRAME * 2  # pcm: s16le


def test_streaming_sends_audio_while_it_is_generated(service):
    """Upstream sent one chunk after the whole generation; here audio arrives while frames are generated."""
    wait_idle(service)
    request = {"text": "A long story about the sea.", "seed": 1, "max_new_tokens": 64, "streaming": True,
               "format": "pcm"}
    started = time.perf_counter()
    arrivals = []
    with httpx.stream("POST", f"{service.url}/v1/tts", json=request, timeout=120) as answer:
        assert answer.status_code == 200
        for chunk in answer.iter_raw():
            arrivals.append((time.perf_counter() - started, len(chunk)))
    total = arrivals[-1][0]
    assert sum(n for _, n in arrivals) == 63 * FRAME * 2
    assert len(arrivals) >= 3 and arrivals[0][0] < 0.5 * total, arrivals


def test_completed_task_survives_a_restart(endless_model_dir: Path, tmp_path: Path):
    data_dir = tmp_path / "data"
    with running_service(tmp_path, fish_env(free_port(), endless_model_dir, data_dir)) as live:
        assert create(live.url, "kept", max_new_tokens=8, format="flac").status_code == 200
        assert wait_for_status(live.url, "kept", {"completed", "failed"})["status"] == "completed"
        kept = httpx.get(f"{live.url}/download_result/kept").content
        before = httpx.get(f"{live.url}/get_task_status/kept").json()
        assert create(live.url, "stopped", max_new_tokens=0).status_code == 200
        assert httpx.post(f"{live.url}/stop_async_task/stopped").json()["success"] is True
        assert create(live.url, "cut", max_new_tokens=0).status_code == 200
        assert wait_for_status(live.url, "cut", {"processing"})["status"] == "processing"
    # The service stopped while "cut" was generating.
    with running_service(tmp_path, fish_env(free_port(), endless_model_dir, data_dir)) as live:
        assert httpx.get(f"{live.url}/get_task_status/kept").json() == before
        download = httpx.get(f"{live.url}/download_result/kept")
        assert download.status_code == 200 and download.content == kept
        assert download.headers["content-type"] == "audio/flac"
        assert httpx.get(f"{live.url}/get_task_status/stopped").json()["status"] == "cancelled"
        cut = httpx.get(f"{live.url}/get_task_status/cut").json()
        assert cut["status"] == "failed" and "interrupted" in cut["error"]
        assert httpx.get(f"{live.url}/download_result/cut").status_code == 400
