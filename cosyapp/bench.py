"""Engine benchmark: time to first chunk, real-time factor and per-stage times of one backend.

Runs on random-weight models too: `fixed_length` makes the LM produce exactly N tokens per sentence, so
runs are comparable whatever the weights. Used by `cosyapp bench engine` and scripts/bench_engine.py.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from cosyapp.engine.registry import load_backend, make_tiny
from cosyapp.engine.stats import StageTimes
from cosyapp.engine.types import Mode, SynthesisRequest

BENCH_TEXT = "Streaming speech synthesis turns text into audio while the rest is still being generated."


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def run_engine_bench(model_dir: Path | None, size: str = "tiny", backend_name: str = "cosyvoice2",
                     device: str = "auto", dtype: str = "auto", prompt_wav: Path | None = None,
                     tokens: int = 100, runs: int = 3, text: str = BENCH_TEXT) -> dict[str, Any]:
    """Load (or make) a model, prepare one voice, then stream `runs` requests of `tokens` LM tokens each."""
    model_label = str(model_dir) if model_dir is not None else f"random {size} {backend_name} model"
    with tempfile.TemporaryDirectory(prefix="cosyapp-bench-") as scratch:
        if model_dir is None:
            model_dir = Path(scratch) / f"random-{size}"
            make_tiny(backend_name, model_dir, size=size)
        start = time.perf_counter()
        backend = load_backend(backend_name, model_dir, device=device, dtype=dtype)
        load_s = time.perf_counter() - start
        rate = backend.info().sample_rate
        if prompt_wav is not None:
            audio, audio_rate = sf.read(prompt_wav, dtype="float32", always_2d=True)
            audio = audio.mean(axis=1)
        else:  # a 4 s harmonic tone stands in for a recording
            audio_rate = 24000
            t = np.arange(4 * audio_rate) / audio_rate
            audio = (0.2 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
        start = time.perf_counter()
        voice = backend.prepare_voice(audio, audio_rate, None)
        voice_s = time.perf_counter() - start

        warm_up = SynthesisRequest(text="Warm up.", voice=voice, mode=Mode.CROSS_LINGUAL, fixed_length=30)
        for _ in backend.synthesize(warm_up):
            pass

        results = []
        stats = StageTimes()
        for run in range(runs):
            request = SynthesisRequest(text=text, voice=voice, mode=Mode.CROSS_LINGUAL, seed=run,
                                       fixed_length=tokens, stats=stats)
            start = time.perf_counter()
            first = None
            samples = 0
            for chunk in backend.synthesize(request):
                if first is None:
                    first = time.perf_counter() - start
                samples += len(chunk)
            elapsed = time.perf_counter() - start
            results.append({"ttfc_s": first, "elapsed_s": elapsed, "audio_s": samples / rate,
                            "rtf": elapsed / (samples / rate)})
    stages = stats.summary()
    return {
        "machine": machine_description(),
        "model": model_label,
        "device": str(getattr(backend, "device", device)),
        "tokens_per_request": tokens,
        "load_s": load_s,
        "voice_prepare_s": voice_s,
        "ttfc_s_median": statistics.median(r["ttfc_s"] for r in results),
        "rtf_median": statistics.median(r["rtf"] for r in results),
        "audio_s_per_request": results[0]["audio_s"],
        "runs": results,
        "stages_ms": {name: round(v["mean_ms"], 2) for name, v in stages.items()},
        "stage_counts": {name: v["count"] for name, v in stages.items()},
    }


def format_engine_report(report: dict[str, Any]) -> str:
    stages = report["stages_ms"]
    lines = [
        f"machine: {report['machine']}",
        f"model: {report['model']} ({report['device']}), {report['tokens_per_request']} LM tokens per request",
        f"load {report['load_s']:.2f} s, voice features {1000 * report['voice_prepare_s']:.0f} ms",
        f"time to first chunk (median): {1000 * report['ttfc_s_median']:.0f} ms",
        f"real-time factor (median):    {report['rtf_median']:.3f}  ({report['audio_s_per_request']:.2f} s audio)",
        "per stage (mean):",
        f"  frontend           {stages.get('frontend', 0):8.2f} ms per call",
        f"  LM                 {stages.get('lm_token', 0):8.2f} ms per token",
        f"  flow               {stages.get('flow_chunk', 0):8.2f} ms per chunk",
        f"  vocoder            {stages.get('vocoder_chunk', 0):8.2f} ms per chunk",
    ]
    return "\n".join(lines)
