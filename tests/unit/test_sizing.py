"""`[engine] max_concurrent = "auto"`: streams sized from the cores on a CPU and from free memory on a GPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from cosyapp.config import Settings, load_settings
from cosyapp.engine import sizing
from cosyapp.server.state import ServiceState


def test_a_cpu_gets_one_stream_per_core_and_at_least_two(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores, streams in ((1, 2), (2, 2), (16, 16)):
        monkeypatch.setattr(sizing.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert sizing.auto_max_concurrent(torch.device("cpu"), []) == (streams, f"{cores} CPU cores, one stream per core")


def test_a_gpu_gets_its_free_memory_after_the_weights_over_the_stream_budget(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    (tmp_path / "llm.pt").write_bytes(b"\0" * 1000)
    (tmp_path / "notes.txt").write_bytes(b"\0" * 10**6)  # not weights
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    for free, streams in ((24 * gib, 9), (200 * gib, sizing.MAX_GPU_STREAMS), (gib, sizing.MIN_STREAMS)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, f=free: (f, 2 * f))
        got, reason = sizing.auto_max_concurrent(torch.device("cuda"), [tmp_path])
        assert got == streams and "Test GPU" in reason
    assert sizing.model_bytes([tmp_path]) == 1000


def test_the_service_states_the_streams_it_chose(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sizing.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    settings = load_settings(env={"COSYAPP_MODEL_DEVICE": "cpu", "COSYAPP_STORAGE_DATA_DIR": str(tmp_path)})
    with caplog.at_level(logging.INFO, logger="cosyapp.server"):
        assert ServiceState(settings).stream_slots() == 3
    assert "max_concurrent auto: 3 streams at once (3 CPU cores, one stream per core)" in caplog.text
    fixed = load_settings(env={"COSYAPP_ENGINE_MAX_CONCURRENT": "5", "COSYAPP_STORAGE_DATA_DIR": str(tmp_path)})
    assert ServiceState(fixed).stream_slots() == 5 and Settings().engine.max_concurrent == "auto"


def test_core_threads_follow_the_size_of_the_audio_stage() -> None:
    small = torch.nn.Sequential(torch.nn.Linear(64, 64, device="meta"), torch.nn.Conv1d(64, 64, 3, device="meta"))
    width = int(sizing.PARALLEL_KERNEL_WEIGHTS ** 0.5) + 1
    large = torch.nn.Linear(width, width, device="meta")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    cores = min(sizing.cpu_cores(), 8)
    assert sizing.core_threads(cpu, 8, small) == sizing.CoreThreads(cores, False)
    assert sizing.core_threads(cpu, 8, small).group_parts == cores  # a group cut per core
    assert sizing.core_threads(cpu, 8, small, large).parallel_kernels is True
    assert sizing.core_threads(cpu, 8, large) == sizing.CoreThreads(cores, True)
    assert sizing.core_threads(cpu, 8, large).group_parts == 1
    assert sizing.core_threads(cpu, 1, large).audio_workers == 1  # never more groups than streams
    assert sizing.core_threads(gpu, 8, small) == sizing.CoreThreads(1, True)
    assert sizing.core_threads(gpu, 8, small).group_parts == 1  # one whole group at a time
