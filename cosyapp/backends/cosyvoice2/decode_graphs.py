"""The batched LM decode step at fixed shapes, replayed from CUDA graphs.

One decode step of the 0.5B LM is ~24 layers x a dozen small kernels: at a few streams the GPU spends
more time waiting for Python to launch them than running them. A CUDA graph records the launches once and
replays them with one call. Graphs need fixed shapes and fixed memory, so the step here always runs on
one of a few batch sizes (rows 0..b-1 of the KV cache, the batch padded up to the next size; a padding
row writes a dummy key/value at its own next position, which its next real step overwrites, as the
batcher already does for rows that are not waiting) and always attends over the whole cache length with
a mask (instead of the host-side `kv_len` bound of the eager step).

Graphs are captured when the step is built (at model load, before any stream runs: the dummy steps of
the capture write position 0 of rows that nobody uses yet). A reallocated KV cache (a longer context)
invalidates them; they are captured again on their next use, from that step's real inputs, so the warm-up
runs before the capture write exactly the keys/values the step itself writes. Captures only restrict CUDA
calls of their own thread, so streams computing flow chunks on other threads are not disturbed.
`capture=False` runs the same fixed-shape step eagerly (any device): the torch fallback, and how the CPU
tests check the fixed-shape step against the eager one.
"""

from __future__ import annotations

from typing import Sequence

import torch

from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
WARM_UP_STEPS = 2  # eager runs before a capture: allocator pools and kernel choices settle outside the graph


class StaticDecodeStep:
    def __init__(self, llm: CosyVoice2LM, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                 capture: bool = True) -> None:
        if capture and llm.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the LM is on {llm.device}")
        max_rows = llm.qwen.max_batch
        self.llm = llm
        self.capture = capture
        self.sizes = sorted({size for size in batch_sizes if 0 < size <= max_rows} | {max_rows})
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._cache_buffer = self._kv_buffer()
        if capture:
            hidden = llm.config.llm_input_size
            for size in self.sizes:
                x = torch.zeros(size, 1, hidden, dtype=llm.llm_decoder.weight.dtype, device=llm.device)
                self._capture(x, torch.zeros(size, 1, dtype=torch.long, device=llm.device))

    def size_for(self, rows: int) -> int | None:
        """The batch size a step over rows 0..rows-1 runs at, or None when it is bigger than every size."""
        return next((size for size in self.sizes if size >= rows), None)

    def __call__(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """x [b, 1, hidden] embeddings at positions input_pos [b, 1], b one of `sizes` -> float32 log-probs
        [b, V] over the speech ids (a fresh tensor: callers may mask it in place)."""
        if x.shape[0] not in self.sizes:
            raise ValueError(f"batch {x.shape[0]} is not one of the fixed sizes {self.sizes}")
        if not self.capture:
            return self._step(x, input_pos)
        if self._kv_buffer() is not self._cache_buffer:  # the cache was reallocated: the graphs point at the old one
            self._graphs.clear()
            self._cache_buffer = self._kv_buffer()
        entry = self._graphs.get(x.shape[0])
        if entry is None:
            entry = self._capture(x, input_pos)
        graph, static_x, static_pos, static_logp = entry
        static_x.copy_(x)
        static_pos.copy_(input_pos)
        graph.replay()
        return static_logp.clone()

    def _step(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        hidden = self.llm(x, input_pos, 0, None)  # kv_len None: the whole cache, masked per row
        return self.llm.speech_logp(hidden[:, -1])

    def _capture(self, x: torch.Tensor, input_pos: torch.Tensor
                 ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]:
        static_x, static_pos = x.clone(), input_pos.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(WARM_UP_STEPS):
                self._step(static_x, static_pos)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_logp = self._step(static_x, static_pos)
        entry = (graph, static_x, static_pos, static_logp)
        self._graphs[x.shape[0]] = entry
        return entry

    def _kv_buffer(self) -> torch.Tensor:
        return self.llm.qwen.layers[0].self_attn.kv_cache.k
