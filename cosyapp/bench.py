"""Engine benchmark: time to first chunk, real-time factor and per-stage times of one backend, and
optionally a chunk profile: flow and vocoder time of every streamed chunk along one long utterance.

Runs on random-weight models too: `fixed_length` makes the LM produce exactly N tokens per sentence, so
runs are comparable whatever the weights. Used by `cosyapp bench engine` and scripts/bench_engine.py.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import soundfile as sf
import torch

from cosyapp.audio import harmonic_tone
from cosyapp.backends.cosyvoice2.backend import CosyVoice2Backend
from cosyapp.backends.cosyvoice2.decode_graphs import StaticDecodeStep
from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM
from cosyapp.backends.cosyvoice2.token2wav import Token2WavStream
from cosyapp.engine.registry import load_backend, make_tiny
from cosyapp.engine.stats import StageTimes
from cosyapp.engine.types import Mode, SynthesisRequest, Voice

BENCH_TEXT = "Streaming speech synthesis turns text into audio while the rest is still being generated."
# Warm-up length before the chunk profile: enough for CosyVoice2's schedule (25 + 50, then 100-token hops) to
# make two full-size hops.
LONG_WARM_UP_TOKENS = 300
# Decode-step timing: the position every row decodes at (prompt text + prompt speech + some speech tokens).
DECODE_POSITION = 300
DECODE_REPEATS = 30


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def run_engine_bench(model_dir: Path | None, size: str = "tiny", backend_name: str = "cosyvoice2",
                     device: str = "auto", dtype: str = "auto", prompt_wav: Path | None = None,
                     tokens: int = 100, runs: int = 3, text: str = BENCH_TEXT, long_tokens: int = 0,
                     batch_streams: Sequence[int] = (),
                     backend_options: dict[str, Any] | None = None, profile_path: Path | None = None
                     ) -> dict[str, Any]:
    """Load (or make) a model, prepare one voice, then stream `runs` requests of `tokens` LM tokens each.

    `long_tokens` > 0 adds one streaming request of that many LM tokens, profiled chunk by chunk
    (`chunk_profile`). `batch_streams` (CosyVoice2) times the vocoding of that many streams at once
    (`chunk_batching_times`). `backend_options` go to the backend as its own options (e.g. flow_left_chunks).
    `profile_path`: one more request under torch's profiler, its busiest operators written there as a table."""
    model_label = str(model_dir) if model_dir is not None else f"random {size} {backend_name} model"
    backend_options = dict(backend_options or {})
    with tempfile.TemporaryDirectory(prefix="cosyapp-bench-") as scratch:
        if model_dir is None:
            model_dir = Path(scratch) / f"random-{size}"
            make_tiny(backend_name, model_dir, size=size)
        start = time.perf_counter()
        backend = load_backend(backend_name, model_dir, device=device, dtype=dtype, **backend_options)
        load_s = time.perf_counter() - start
        on_cuda = getattr(backend, "device", torch.device("cpu")).type == "cuda"
        loaded_bytes = torch.cuda.memory_allocated() if on_cuda else 0
        rate = backend.info().sample_rate
        if prompt_wav is not None:
            audio, audio_rate = sf.read(prompt_wav, dtype="float32", always_2d=True)
            audio = audio.mean(axis=1)
        else:
            audio_rate = 24000
            audio = harmonic_tone(audio_rate)
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

        decode_steps = decode_step_times(backend.llm) if isinstance(getattr(backend, "llm", None), CosyVoice2LM) \
            else None
        profile = None
        if long_tokens > 0:
            # The short requests above never reach the full-size hop; without this its first call would also
            # pay for the first run of that shape (allocator, kernel choice) and make the profile's baseline slow.
            warm_up = SynthesisRequest(text=text, voice=voice, mode=Mode.CROSS_LINGUAL,
                                       fixed_length=min(long_tokens, LONG_WARM_UP_TOKENS))
            for _ in backend.synthesize(warm_up):
                pass
            long_stats = StageTimes()
            request = SynthesisRequest(text=text, voice=voice, mode=Mode.CROSS_LINGUAL, seed=0,
                                       fixed_length=long_tokens, stats=long_stats)
            start = time.perf_counter()
            chunk_samples = [len(chunk) for chunk in backend.synthesize(request)]
            profile = chunk_profile(chunk_samples, long_stats.seconds["flow_chunk"],
                                    long_stats.seconds["vocoder_chunk"], long_tokens, rate,
                                    elapsed_s=time.perf_counter() - start)
        if profile_path is not None:
            profile_request(backend, SynthesisRequest(text=text, voice=voice, mode=Mode.CROSS_LINGUAL, seed=0,
                                                      fixed_length=tokens), profile_path)
        batching = chunk_batching_times(backend, voice, tokens, batch_streams, runs) \
            if batch_streams and isinstance(backend, CosyVoice2Backend) else None
    stages = stats.summary()
    report = {
        "machine": machine_description(),
        "model": model_label,
        "device": str(getattr(backend, "device", device)),
        "backend_options": backend_options,
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
    if on_cuda:
        # What the model and its caches hold after loading, and the peak of everything run above (the
        # batch-streams run included): peak - loaded over the most streams run at once is the memory a stream
        # adds.
        report["cuda_memory"] = {"loaded_mb": round(loaded_bytes / 2**20),
                                 "peak_mb": round(torch.cuda.max_memory_allocated() / 2**20),
                                 "most_streams_at_once": max(batch_streams, default=1)}
    if decode_steps is not None:
        report["decode_step"] = decode_steps
    if profile is not None:
        report["chunk_profile"] = profile
    if batching is not None:
        report["chunk_batching"] = batching
    return report


def profile_request(backend: Any, request: SynthesisRequest, path: Path) -> None:
    """One request under torch's profiler (every thread's operators, CUDA kernels on a GPU) -> a table of the
    operators by total device time (GPU) or CPU time, and by CPU time, written to `path`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    on_cuda = torch.cuda.is_available() and getattr(backend, "device", torch.device("cpu")).type == "cuda"
    if on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in backend.synthesize(request):
            pass
        if on_cuda:
            torch.cuda.synchronize()
    averages = profiler.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=30)]
    if on_cuda:
        tables.insert(0, averages.table(sort_by="self_cuda_time_total", row_limit=30))
    path.write_text("\n\n".join(tables))


def chunk_batching_times(backend: CosyVoice2Backend, voice: Voice, tokens: int, stream_counts: Sequence[int],
                         runs: int) -> dict[str, Any]:
    """Vocoding (flow + HiFT) of `tokens` random LM tokens for n streams at once, all in step, their chunks
    grouped by shape key into batched calls as the engine's core loop groups them; best of `runs`.

    n x (one stream's time) / (n streams' time) is how much more audio per second n streams get out of the
    vocoding than one stream: with the vocoding most of a request's work, it bounds what concurrency can gain.
    """
    features = voice.features
    token2wav = backend.token2wav
    generator = torch.Generator().manual_seed(0)
    token_ids = torch.randint(0, backend.config.llm.speech_token_size, (max(stream_counts), tokens),
                              generator=generator)
    batches: dict[int, int] = {}

    @torch.inference_mode()
    def all_at_once(count: int) -> float:
        sessions = [token2wav.new_stream(features.speech_token, features.speech_feat, features.embedding,
                                         seed=index) for index in range(count)]
        start = time.perf_counter()
        # As if the LM had made every token already: every chunk of every stream, groups of one key together.
        for index, session in enumerate(sessions):
            session.add(token_ids[index].to(backend.device))
        while any(not session.finished for session in sessions):
            groups: dict[Any, list[Token2WavStream]] = {}
            for session in sessions:
                if not session.finished:
                    groups.setdefault(session.chunk_key() or id(session), []).append(session)
            for group in groups.values():
                batches[len(group)] = batches.get(len(group), 0) + 1
                token2wav.vocode_group(group)
        if backend.device.type == "cuda":
            torch.cuda.synchronize(backend.device)
        return time.perf_counter() - start

    rows = {}
    for count in sorted(set(stream_counts)):
        all_at_once(count)  # warm-up: first runs of these batch shapes
        batches.clear()
        wall_s = min(all_at_once(count) for _ in range(runs))
        rows[count] = {"wall_ms": 1000.0 * wall_s,
                       "batches": {size: number // runs for size, number in sorted(batches.items())}}
    alone_ms = rows[min(rows)]["wall_ms"] / min(rows)
    for count, row in rows.items():
        row["per_stream_ms"] = row["wall_ms"] / count
        row["speed_up"] = count * alone_ms / row["wall_ms"]
    return {"tokens": tokens, "streams": rows}


def format_chunk_batching(batching: dict[str, Any]) -> str:
    lines = [
        f"vocoding of {batching['tokens']} LM tokens per stream, all streams in step (flow + HiFT, chunks "
        "of one shape key batched):",
        "  streams   wall ms  per stream ms  audio/s vs the fewest  batches (size: count)",
    ]
    for count, row in batching["streams"].items():
        batches = ", ".join(f"{size}: {number}" for size, number in row["batches"].items())
        lines.append(f"  {count:7d}  {row['wall_ms']:8.1f}  {row['per_stream_ms']:13.1f}  "
                     f"{row['speed_up']:20.2f}x  {batches}")
    return "\n".join(lines)


@torch.inference_mode()
def decode_step_times(llm: CosyVoice2LM) -> dict[str, Any]:
    """Time of one batched LM decode step per batch size: the eager step (rows 0..b-1, attention bounded
    by the host-side length) against the fixed-shape step the batcher uses on a GPU (CUDA graphs; on the
    CPU the same fixed shapes run eagerly). Run with no stream active: it writes into cache rows 0..b-1."""
    capture = llm.device.type == "cuda"
    step = StaticDecodeStep(llm, capture=capture)
    position = min(DECODE_POSITION, llm.qwen.max_seq_len - 1)
    steps = {}
    for size in step.sizes:
        x = llm.speech_embedding(torch.zeros(size, dtype=torch.long, device=llm.device)).unsqueeze(1)
        positions = torch.full((size, 1), position, device=llm.device)
        eager_ms = _mean_ms(lambda: llm.speech_logp(llm(x, positions, 0, position + 1)[:, -1]), llm.device)
        fixed_ms = _mean_ms(lambda: step(x, positions), llm.device)
        steps[size] = {"eager_ms": eager_ms, "fixed_ms": fixed_ms}
    return {"fixed_step": "CUDA graphs" if capture else "fixed shapes, eager (no CUDA device)",
            "position": position, "steps": steps}


def _mean_ms(run: Any, device: torch.device) -> float:
    for _ in range(3):  # warm-up (and the graph capture)
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(DECODE_REPEATS):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000.0 * (time.perf_counter() - start) / DECODE_REPEATS


def chunk_profile(chunk_samples: list[int], flow_s: list[float], vocoder_s: list[float], tokens: int,
                  sample_rate: int, elapsed_s: float) -> dict[str, Any]:
    """Per-chunk table of one streaming request of `tokens` LM tokens: the audio each chunk carries (in LM
    tokens and seconds) with the flow and vocoder time of the call that made it, in stream order.

    Token positions come from the audio itself: the request's `tokens` tokens became all its samples, so a
    chunk of k samples carries k * tokens / total samples tokens' worth of audio. The streaming schedule
    grows its hop to a largest size and keeps it until the final call, so the chunks of that size (all but
    the last, which flushes the rest) cost the same work if nothing grows along the utterance: the first
    and last of them are compared."""
    if not (len(chunk_samples) == len(flow_s) == len(vocoder_s)):
        raise ValueError(f"expected one flow and one vocoder call per chunk, got {len(chunk_samples)} chunks, "
                         f"{len(flow_s)} flow and {len(vocoder_s)} vocoder calls")
    total = sum(chunk_samples)
    if total == 0:
        raise ValueError("the request produced no audio")
    samples_per_token = total / tokens
    chunks = []
    position = 0
    for index, (samples, flow, vocoder) in enumerate(zip(chunk_samples, flow_s, vocoder_s), start=1):
        chunks.append({
            "index": index,
            "start_token": round(position / samples_per_token, 2),
            "end_token": round((position + samples) / samples_per_token, 2),
            "tokens": round(samples / samples_per_token, 2),
            "audio_s": samples / sample_rate,
            "flow_ms": 1000.0 * flow,
            "vocoder_ms": 1000.0 * vocoder,
            "final": index == len(chunk_samples),
        })
        position += samples
    hops = chunks[:-1]
    full_hop_tokens = max((chunk["tokens"] for chunk in hops), default=None)
    full_hops = [chunk for chunk in hops if chunk["tokens"] == full_hop_tokens]
    profile: dict[str, Any] = {
        "tokens": tokens,
        "audio_s": total / sample_rate,
        "elapsed_s": elapsed_s,
        "rtf": elapsed_s / (total / sample_rate),
        "chunks": chunks,
        "full_hop_tokens": full_hop_tokens,
        "full_hop_indices": [chunk["index"] for chunk in full_hops],
        "first_full_hop_flow_ms": None,
        "last_full_hop_flow_ms": None,
        "flow_ratio": None,
        "vocoder_ratio": None,
    }
    if len(full_hops) >= 2:
        first, last = full_hops[0], full_hops[-1]
        profile["first_full_hop_flow_ms"] = first["flow_ms"]
        profile["last_full_hop_flow_ms"] = last["flow_ms"]
        profile["flow_ratio"] = last["flow_ms"] / first["flow_ms"]
        profile["vocoder_ratio"] = last["vocoder_ms"] / first["vocoder_ms"]
    return profile


def format_chunk_profile(profile: dict[str, Any]) -> str:
    lines = [
        f"chunk profile: one streaming request of {profile['tokens']} LM tokens ({profile['audio_s']:.2f} s audio, "
        f"RTF {profile['rtf']:.3f})",
        "  tokens: the LM tokens whose audio the chunk carries (each chunk but the last holds back a short",
        "  tail for the cross-fade with the next, so the first is a little short of its hop and the last long)",
        "  chunk     tokens (from - to)    flow ms  vocoder ms",
    ]
    for chunk in profile["chunks"]:
        span = f"{chunk['tokens']:g} ({chunk['start_token']:g} - {chunk['end_token']:g})"
        note = "  final call" if chunk["final"] else ""
        lines.append(f"  {chunk['index']:5d}  {span:>22}  {chunk['flow_ms']:9.2f}  {chunk['vocoder_ms']:10.2f}{note}")
    size = profile["full_hop_tokens"]
    if profile["flow_ratio"] is None:
        lines.append("flow per chunk: fewer than two hops of the full size to compare; use more tokens")
        return "\n".join(lines)
    first, last = profile["full_hop_indices"][0], profile["full_hop_indices"][-1]
    lines += [
        f"flow per chunk: first {size:g}-token hop (chunk {first}) {profile['first_full_hop_flow_ms']:.2f} ms, "
        f"last {size:g}-token hop (chunk {last}) {profile['last_full_hop_flow_ms']:.2f} ms, "
        f"ratio {profile['flow_ratio']:.2f}",
        f"  (hops of the same size compared; the shorter first hops and the final call are left out; "
        f"vocoder ratio {profile['vocoder_ratio']:.2f})",
    ]
    return "\n".join(lines)


def format_engine_report(report: dict[str, Any]) -> str:
    stages = report["stages_ms"]
    options = report.get("backend_options") or {}
    lines = [
        f"machine: {report['machine']}",
        f"model: {report['model']} ({report['device']}), {report['tokens_per_request']} LM tokens per request",
    ]
    if options:
        lines.append("backend options: " + ", ".join(f"{name}={value}" for name, value in options.items()))
    lines += [
        f"load {report['load_s']:.2f} s, voice features {1000 * report['voice_prepare_s']:.0f} ms",
        f"time to first chunk (median): {1000 * report['ttfc_s_median']:.0f} ms",
        f"real-time factor (median):    {report['rtf_median']:.3f}  ({report['audio_s_per_request']:.2f} s audio)",
        "per stage (mean):",
        f"  frontend           {stages.get('frontend', 0):8.2f} ms per call",
        f"  LM                 {stages.get('lm_token', 0):8.2f} ms per token",
        f"  flow               {stages.get('flow_chunk', 0):8.2f} ms per chunk",
        f"  vocoder            {stages.get('vocoder_chunk', 0):8.2f} ms per chunk",
    ]
    if "decode_step" in report:
        decode = report["decode_step"]
        lines.append(f"LM decode step at position {decode['position']}, eager vs {decode['fixed_step']}:")
        for size, times in decode["steps"].items():
            lines.append(f"  batch {size:3d}  eager {times['eager_ms']:7.2f} ms  fixed {times['fixed_ms']:7.2f} ms"
                         f"  ({times['eager_ms'] / times['fixed_ms']:.2f}x)")
    if "chunk_batching" in report:
        lines.append(format_chunk_batching(report["chunk_batching"]))
    if "chunk_profile" in report:
        lines.append(format_chunk_profile(report["chunk_profile"]))
    return "\n".join(lines)
