"""One summary of a benchmark folder written by scripts/gpu_bench.sh: the device check, the engine benchmark
and the HTTP load levels of each checkout, as JSON (the shape of docs/benchmarks/h200.json) and a table.

Files read (any may be missing: a failed step leaves its file out and the summary says so):
machine.txt, steps.txt, device_check.json, engine_<label>.json, service_<texts>_<label>.json, where label
is `current` or `baseline` and texts is `fixed`, `natural` or `fish`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SERVICE_RUNS = {"fixed": "cosyvoice2", "natural": "cosyvoice2", "fish": "fish"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000.0 * seconds, 1)


def level_rows(report: dict[str, Any], backend: str, texts: str, label: str) -> list[dict[str, Any]]:
    rows = []
    for level in report.get("levels", []):
        first = level["first_audio_s"]
        rows.append({
            "backend": backend, "checkout": label, "texts": texts, "concurrency": level["concurrency"],
            "requests": level["requests"], "ok": level["ok"],
            "first_audio_ms": {key: _ms(first[key]) for key in ("p50", "p95", "p99")},
            "x_real_time": round(level["audio_s_per_s"], 2),
            "rtf_median": level["rtf_median"],
            "underruns": level["underruns_total"],
        })
    return rows


def engine_summary(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("machine", "device", "tokens_per_request", "load_s", "ttfc_s_median", "rtf_median", "stages_ms",
            "decode_step", "chunk_batching", "cuda_memory")
    return {key: report[key] for key in keys if key in report}


def summarize_dir(folder: Path) -> dict[str, Any]:
    steps = {}
    steps_file = folder / "steps.txt"
    if steps_file.is_file():
        for line in steps_file.read_text().splitlines():
            name, rc, seconds = line.split()
            code = rc.removeprefix("rc=")
            steps[name] = {"rc": int(code) if code.lstrip("-").isdigit() else code,
                           "seconds": int(seconds.removesuffix("s"))}
    machine = (folder / "machine.txt").read_text().strip() if (folder / "machine.txt").is_file() else ""
    summary: dict[str, Any] = {"machine": machine, "steps": steps,
                               "device_check": _read_json(folder / "device_check.json"),
                               "engine": {}, "levels": []}
    for label in ("baseline", "current"):
        engine = _read_json(folder / f"engine_{label}.json")
        if engine is not None:
            summary["engine"][label] = engine_summary(engine)
        for texts, backend in SERVICE_RUNS.items():
            service = _read_json(folder / f"service_{texts}_{label}.json")
            if service is not None:
                summary.setdefault("commits", {})[label] = service.get("commit")
                summary["levels"] += level_rows(service, backend, texts, label)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [summary["machine"], ""]
    failed = [name for name, step in summary["steps"].items() if step["rc"] != 0]
    lines.append("steps: " + ", ".join(f"{name} {step['seconds']} s" for name, step in summary["steps"].items()))
    if failed:
        lines.append("FAILED steps: " + ", ".join(failed))
    check = summary["device_check"]
    if check is not None:
        lines.append("device check: " + ("all stages within tolerance" if check["passed"] else "OUT OF TOLERANCE"))
        for row in check["checks"]:
            tolerance = "reported" if row["tolerance"] is None else f"tol {row['tolerance']:.0e}"
            lines.append(f"  {row['backend']:10} {row['stage']:42} {row['precision']:9} {row['rel_error']:9.2e} "
                         f"{tolerance}")
    for label, engine in summary["engine"].items():
        lines.append(f"engine ({label}): first chunk {1000 * engine['ttfc_s_median']:.0f} ms, RTF "
                     f"{engine['rtf_median']:.3f}, stages ms {engine['stages_ms']}")
        for size, times in engine.get("decode_step", {}).get("steps", {}).items():
            lines.append(f"  decode step batch {size:>3}: eager {times['eager_ms']:.2f} ms, "
                         f"fixed {times['fixed_ms']:.2f} ms")
        for count, row in engine.get("chunk_batching", {}).get("streams", {}).items():
            lines.append(f"  vocoding {count:>3} streams at once: {row['wall_ms']:.0f} ms, "
                         f"{row['speed_up']:.2f}x the audio per second of one")
        if "cuda_memory" in engine:
            lines.append(f"  GPU memory: {engine['cuda_memory']}")
    lines += ["", f"{'backend':10} {'checkout':9} {'texts':8} {'conc':>4} {'req':>4} {'ok':>4} "
                  f"{'first audio p50/p95/p99 ms':>27} {'x real time':>11} {'underruns':>9}"]
    for row in summary["levels"]:
        first = row["first_audio_ms"]
        cells = "/".join("-" if first[k] is None else f"{first[k]:.0f}" for k in ("p50", "p95", "p99"))
        lines.append(f"{row['backend']:10} {row['checkout']:9} {row['texts']:8} {row['concurrency']:>4} "
                     f"{row['requests']:>4} {row['ok']:>4} {cells:>27} {row['x_real_time']:>11.2f} "
                     f"{row['underruns']:>9}")
    return "\n".join(lines)
