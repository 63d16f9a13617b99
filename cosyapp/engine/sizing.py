"""How many streams a box synthesizes at once when `[engine] max_concurrent = "auto"`.

- On a GPU, memory decides: what is free before loading, less the weights, over what one stream may hold
  (its LM KV-cache row, its flow and vocoder caches, the activations of its share of a batched call), capped
  at MAX_GPU_STREAMS, the most streams the load benchmark runs (beyond it first-audio latency, not memory,
  is what runs out).
- On a CPU, cores decide: one stream keeps about one core busy, and more streams than cores only queue
  inside the machine instead of in the admission queue, where they would at least be answered 503 in time.

And how a backend's core loop uses the cores (`core_threads`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Device memory one stream may hold, all caches at their bounds. CosyVoice2-0.5B: the streaming flow's caches
# are capped at 2 GiB per stream (flow_stream.DEFAULT_CACHE_BUDGET_BYTES; a 6 s prompt and 8 chunks of left
# context in float32 fill ~4 MB per frame x 900 frames), a 4096-position bf16 KV row is 50 MB, plus the
# activations of its share of a batched call.
GPU_BYTES_PER_STREAM = 5 << 29  # 2.5 GiB
MAX_GPU_STREAMS = 64
MIN_STREAMS = 2


def model_bytes(model_dirs: list[Path]) -> int:
    """Bytes of the weight files in the model directories (what loading them puts on the device, at most)."""
    total = 0
    for folder in model_dirs:
        for path in Path(folder).rglob("*"):
            if path.is_file() and path.suffix in (".pt", ".pth", ".onnx", ".bin", ".safetensors"):
                total += path.stat().st_size
    return total


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Weights in the matrix and convolution layers of a model's audio stage from which its calls gain from several
# intra-op threads on a CPU. Below it (the tiny test models: 0.5-13 M; the released CosyVoice2 flow + HiFT: 130 M)
# a call is thousands of small kernels, each split across cores costs a thread-team wake-up (tens of
# microseconds once two threads run teams of their own) that the kernel's arithmetic never pays back.
PARALLEL_KERNEL_WEIGHTS = 32_000_000


@dataclass(frozen=True)
class CoreThreads:
    """How a backend's core uses the CPU's cores: `audio_workers` audio groups computed at once, and whether a
    call's kernels are split across cores (`parallel_kernels`; else every core thread runs one intra-op thread
    and the cores go to streams side by side)."""
    audio_workers: int
    parallel_kernels: bool

    @property
    def group_parts(self) -> int:
        """Parts a group of several streams is cut into: one per audio thread where each runs one intra-op
        thread; the whole group in one call where a call's kernels already use every core."""
        return 1 if self.parallel_kernels else self.audio_workers


def core_threads(device: torch.device, rows: int, *audio_modules: Any) -> CoreThreads:
    """A GPU computes audio groups in turn anyway: one at a time, whole. On a CPU there are as many audio threads
    as cores (more would only make the first chunk someone waits for share its core). A model whose audio stage
    is large enough (PARALLEL_KERNEL_WEIGHTS) splits each call across the cores the LM and the other groups
    leave free; a small one runs every call on one intra-op thread and cuts a group into one part per core."""
    if device.type != "cpu":
        return CoreThreads(1, True)
    threads = max(1, min(cpu_cores(), rows))
    weights = sum(module.weight.numel() for model in audio_modules if isinstance(model, torch.nn.Module)
                  for module in model.modules()
                  if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.ConvTranspose1d)))
    if weights >= PARALLEL_KERNEL_WEIGHTS:
        return CoreThreads(threads, True)
    return CoreThreads(threads, False)


def auto_max_concurrent(device: torch.device, model_dirs: list[Path]) -> tuple[int, str]:
    """(streams, the reason in words) for a box about to load `model_dirs` on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        room = free - model_bytes(model_dirs)
        streams = max(MIN_STREAMS, min(MAX_GPU_STREAMS, room // GPU_BYTES_PER_STREAM))
        return streams, (f"{free / 2**30:.1f} GiB free on {torch.cuda.get_device_name(device)}, "
                         f"{GPU_BYTES_PER_STREAM / 2**30:g} GiB per stream after the weights, at most "
                         f"{MAX_GPU_STREAMS}")
    cores = cpu_cores()
    return max(MIN_STREAMS, cores), f"{cores} CPU cores, one stream per core"
