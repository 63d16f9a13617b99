"""LM weights benchmark of a CosyVoice model on the CPU: float32 against `lm_weights` (int8), `cosyapp bench lm`.

Both LMs get the same zero-shot prompt (the default prompt voice, its transcript, the benchmark text):
- speed: one batched decode step at each row count (median of `steps`, every row at position DECODE_POSITION)
  and the prefill of the prompt (median of PREFILL_REPEATS), the two LMs taking turns;
- teacher-forced agreement: the float32 LM samples `tokens` speech tokens with its seeded sampler (stop ids
  banned, so random weights run as long as asked); each LM then reads prompt + those tokens in one forward, and
  at every position the next-token distributions are compared: equal argmax, KL(float32 || other), the largest
  log-prob difference;
- free-running agreement: each LM samples with the same seed; how many tokens the two sequences share from the
  start.
Random weights give flat next-token distributions, whose argmax and samples turn on tiny margins: on them the
agreement says little about a trained model, whose distributions are peaked.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import soundfile as sf
import torch

from cosyapp.backends.cosyvoice2.decoding import generate
from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM
from cosyapp.backends.cosyvoice2.lm_weights import use_lm_weights
from cosyapp.bench import BENCH_TEXT, DECODE_POSITION, machine_description
from cosyapp.config import DefaultsSettings
from cosyapp.engine.registry import make_tiny
from cosyapp.engine.types import Mode

PROMPT_TRANSCRIPT = "欢迎光临，请问您需要点什么？"  # of the default prompt voice (README: "The default prompt voice")
WARM_UP_RUNS = 2
PREFILL_REPEATS = 5


def _model_classes(backend: str) -> tuple[Any, type[CosyVoice2LM], Any]:
    """(config class, LM class, frontend class) of a CosyVoice backend."""
    if backend == "cosyvoice2":
        from cosyapp.backends.cosyvoice2.config import CosyVoice2Config
        from cosyapp.backends.cosyvoice2.frontend import CosyVoice2Frontend
        return CosyVoice2Config, CosyVoice2LM, CosyVoice2Frontend
    if backend == "cosyvoice3":
        from cosyapp.backends.cosyvoice3.config import CosyVoice3Config
        from cosyapp.backends.cosyvoice3.frontend import CosyVoice3Frontend
        from cosyapp.backends.cosyvoice3.llm import CosyVoice3LM
        return CosyVoice3Config, CosyVoice3LM, CosyVoice3Frontend
    raise ValueError(f"the LM benchmark runs the CosyVoice backends, not {backend!r}")


def _median_ms(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median ms of each run, the runs taking turns (a burst of other load on the machine hits them alike)."""
    for run in runs.values():
        for _ in range(WARM_UP_RUNS):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(values) for name, values in times.items()}


@torch.inference_mode()
def lm_times(llms: dict[str, CosyVoice2LM], lm_input: torch.Tensor, row_counts: Sequence[int],
             steps: int) -> dict[str, dict[str, Any]]:
    """Per LM: median ms of one decode step per row count (rows 0..n-1, each at DECODE_POSITION) and of the
    prompt's prefill into row 0."""
    embedding = next(iter(llms.values())).speech_embedding  # float in every LM: the same inputs for each
    for llm in llms.values():
        llm.ensure_cache(max(DECODE_POSITION + 1, lm_input.shape[1]))
    times: dict[str, dict[str, Any]] = {name: {"step_ms": {}} for name in llms}
    for rows in row_counts:
        x = embedding(torch.arange(rows)).unsqueeze(1)
        positions = torch.full((rows, 1), DECODE_POSITION)
        medians = _median_ms({name: functools.partial(_decode_step, llm, x, positions) for name, llm in llms.items()},
                             steps)
        for name, ms in medians.items():
            times[name]["step_ms"][rows] = ms
    medians = _median_ms({name: functools.partial(llm.prefill_logp, [lm_input], 0) for name, llm in llms.items()},
                         PREFILL_REPEATS)
    for name, ms in medians.items():
        times[name]["prefill_ms"] = ms
    return times


def _decode_step(llm: CosyVoice2LM, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return llm.speech_logp(llm(x, positions, 0, DECODE_POSITION + 1)[:, -1])


def sampled_tokens(llm: CosyVoice2LM, lm_input: torch.Tensor, tokens: int, seed: int) -> list[int]:
    """`tokens` speech tokens from the LM's seeded sampler (stop ids banned)."""
    return list(generate(llm, lm_input, 0, tokens, torch.Generator().manual_seed(seed), fixed_length=tokens))


@torch.inference_mode()
def forced_logp(llm: CosyVoice2LM, lm_input: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Log-probs [len(tokens), V] of the token at each step, the prompt and the tokens before it read in one
    forward (what step-by-step decoding computes, up to float rounding)."""
    fed = llm.speech_embedding(torch.tensor(tokens[:-1], dtype=torch.long)).unsqueeze(0)
    x = torch.cat([lm_input, fed], dim=1)
    length = x.shape[1]
    llm.ensure_cache(length)
    hidden = llm(x, torch.arange(length)[None], 0, length)
    return llm.speech_logp(hidden[0, lm_input.shape[1] - 1:])


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    """Positions where the argmax of log-probs [T, V] agree, mean KL(reference || other), largest difference, and
    the reference's mean top probability."""
    kl = (reference.exp() * (reference - other)).sum(-1)
    return {"positions": reference.shape[0],
            "reference_top1_prob": float(reference.exp().amax(-1).mean()),  # how peaked the distributions are
            "argmax_equal": int((reference.argmax(-1) == other.argmax(-1)).sum()),
            "mean_kl": float(kl.mean()),
            "max_abs_logp": float((reference - other).abs().max())}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_lm_bench(model_dir: Path | None, size: str = "tiny", backend: str = "cosyvoice2", lm_weights: str = "int8",
                 row_counts: Sequence[int] = (1, 8), tokens: int = 150, steps: int = 20,
                 seed: int = 0) -> dict[str, Any]:
    """Load (or make) a model's LM twice on the CPU, float32 and with `lm_weights`, and compare them (see the
    module docstring)."""
    config_class, lm_class, frontend_class = _model_classes(backend)
    rows = max(row_counts)
    with tempfile.TemporaryDirectory(prefix="cosyapp-bench-") as scratch:
        if model_dir is None:
            model_dir = Path(scratch) / f"random-{size}"
            make_tiny(backend, model_dir, size=size)
            label = f"random {size} {backend} model"
        else:
            label = str(model_dir)
        config = config_class.from_model_dir(model_dir)
        frontend = frontend_class(model_dir, config)
        audio, rate = sf.read(DefaultsSettings().prompt_wav, dtype="float32")
        model_input = frontend.build_model_input(Mode.ZERO_SHOT, frontend.text_sentences(BENCH_TEXT)[0],
                                                 frontend.extract_voice(audio, rate),
                                                 frontend.prompt_text_ids(PROMPT_TRANSCRIPT))
        reference = lm_class.from_pretrained(model_dir, config)
        other = lm_class.from_pretrained(model_dir, config)
        used = use_lm_weights(other, lm_weights)
    for llm in (reference, other):
        llm.setup_cache(rows, DECODE_POSITION + 1)
    with torch.inference_mode():
        lm_input = reference.build_lm_input(model_input.text, model_input.prompt_text,
                                            model_input.llm_prompt_speech_token)
    forced = sampled_tokens(reference, lm_input, tokens, seed)
    free = sampled_tokens(other, lm_input, tokens, seed)
    return {
        "machine": machine_description(), "model": label, "backend": backend, "lm_weights": used,
        "prompt_positions": lm_input.shape[1], "decode_position": DECODE_POSITION, "steps": steps,
        "times": lm_times({"float32": reference, used: other}, lm_input, row_counts, steps),
        "teacher_forced": agreement(forced_logp(reference, lm_input, forced), forced_logp(other, lm_input, forced)),
        "free_running": {"tokens": tokens, "seed": seed, "common_prefix": common_prefix(forced, free)},
    }


def format_lm_report(report: dict[str, Any]) -> str:
    used = report["lm_weights"]
    base, other = report["times"]["float32"], report["times"][used]
    lines = [
        f"{report['backend']} LM, {report['model']} ({report['machine']}): float32 against {used}",
        f"  decode step at position {report['decode_position']} (median of {report['steps']}) and prefill of the "
        f"{report['prompt_positions']}-position zero-shot prompt:",
        f"  {'':18}{'float32 ms':>12}{used + ' ms':>12}{'speed-up':>10}",
    ]
    for rows, ms in base["step_ms"].items():
        lines.append(f"  step, {rows:2d} row(s)    {ms:12.2f}{other['step_ms'][rows]:12.2f}"
                     f"{ms / other['step_ms'][rows]:9.2f}x")
    lines.append(f"  prefill           {base['prefill_ms']:12.2f}{other['prefill_ms']:12.2f}"
                 f"{base['prefill_ms'] / other['prefill_ms']:9.2f}x")
    forced, free = report["teacher_forced"], report["free_running"]
    lines += [
        f"  teacher-forced over float32's {forced['positions']} sampled tokens (float32's top probability "
        f"{forced['reference_top1_prob']:.3f} on average):",
        f"    argmax equal at {forced['argmax_equal']}/{forced['positions']}, mean KL {forced['mean_kl']:.2e}, "
        f"max |d log-prob| {forced['max_abs_logp']:.3f}",
        f"  free-running, seed {free['seed']}: the first {free['common_prefix']} of {free['tokens']} tokens equal",
    ]
    return "\n".join(lines)
