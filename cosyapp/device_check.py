"""Accelerator outputs against CPU float32 outputs, stage by stage, on the same inputs.

The model runs twice: on the CPU in float32 (the reference, what the golden parity tests check against
upstream) and on the target device at the precision serving uses there (bf16 transformers on a GPU). Each
stage is fed the same input on both sides, so an error does not carry over from one stage into the next,
and is compared by the relative L2 error ||out - ref|| / ||ref||. Tolerances follow the arithmetic:

- float32 stages on a GPU (flow, HiFT, codec): cuDNN convolutions use TF32 by default (10-bit mantissa,
  ~5e-4 relative per product) and reduction orders differ, so 5e-3 relative over the whole output;
- bf16 transformer stages (CosyVoice2 LM, Fish slow transformer): bf16 keeps 8 bits of mantissa (3.9e-3
  relative rounding per value) and the error of ~24 residual layers adds up, so 5e-2 on the logits
  (centred per position: a constant shift of a row's logits changes no probability);
- the decoded tokens: greedy ids under forced decoding agree where the top two logits are further apart
  than bf16's error; on random weights many positions are near ties, so agreement is reported, not judged.

A stage passes when its error is at most its tolerance and the output is finite. `run_device_check`
returns the rows; `format_device_check` prints them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cosyapp.audio import harmonic_tone

FORCED_TOKENS = 150
TOL_FLOAT32 = 5e-3
TOL_BF16_LOGITS = 5e-2


@dataclass
class StageCheck:
    backend: str
    stage: str
    precision: str
    rel_error: float
    tolerance: float | None  # None: reported, not judged
    detail: str = ""

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel_error)) and (self.tolerance is None or self.rel_error <= self.tolerance)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def centred(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.double().cpu()
    return logits - logits.mean(dim=-1, keepdim=True)


@torch.inference_mode()
def check_cosyvoice2(model_dir: Path, device: str) -> list[StageCheck]:
    from cosyapp.backends.cosyvoice2.backend import CosyVoice2Backend
    from cosyapp.backends.cosyvoice2.decode_graphs import StaticDecodeStep
    from cosyapp.engine.types import Mode

    ref = CosyVoice2Backend(model_dir, device="cpu", dtype="float32", max_streams=1, lm_context=1024,
                            random_source=False, tensorrt=False)
    dut = CosyVoice2Backend(model_dir, device=device, max_streams=1, lm_context=1024, random_source=False)
    lm_dtype = str(dut.llm.llm_decoder.weight.dtype).removeprefix("torch.")
    flow_dtype = str(dut.flow.encoder_proj.weight.dtype).removeprefix("torch.")
    voice = ref.prepare_voice(harmonic_tone(24000), 24000).features
    text_ids = ref.frontend.text_sentences("The quick brown fox jumps over the lazy dog.")[0]
    model_input = ref.frontend.build_model_input(Mode.CROSS_LINGUAL, text_ids, voice, None)
    lm_input = ref.llm.build_lm_input(model_input.text, model_input.prompt_text, model_input.llm_prompt_speech_token)
    tokens = torch.randint(0, ref.config.llm.speech_token_size, (FORCED_TOKENS,),
                           generator=torch.Generator().manual_seed(0))
    checks = []

    # LM: the reference prefills prompt + forced tokens in one forward; the device prefills the prompt and
    # decodes the forced tokens one step at a time through the serving path (fixed-shape step, CUDA graphs).
    length = lm_input.shape[1]
    sequence = torch.cat([lm_input, ref.llm.speech_embedding(tokens[:-1]).unsqueeze(0)], dim=1)
    positions = torch.arange(sequence.shape[1]).unsqueeze(0)
    ref_logits = ref.llm.llm_decoder(ref.llm(sequence, positions, 0, sequence.shape[1])[0, length - 1:])
    dut_llm = dut.llm
    step = StaticDecodeStep(dut_llm, capture=dut.device.type == "cuda")
    logp = [dut_llm.prefill_logp([lm_input.to(dut.device, dut_llm.llm_decoder.weight.dtype)], 0)[0]]
    for i, token in enumerate(tokens[:-1].tolist()):
        x = dut_llm.speech_embedding(torch.tensor([token], device=dut.device)).view(1, 1, -1)
        logp.append(step(x, torch.tensor([[length + i]], device=dut.device))[0])
    dut_logp = torch.stack(logp)
    ref_logp = ref_logits.float().log_softmax(-1)
    agree = float((dut_logp.argmax(-1).cpu() == ref_logp.argmax(-1)).float().mean())
    checks.append(StageCheck("cosyvoice2", "lm forced decode (centred log-probs)", lm_dtype,
                             rel_error(centred(dut_logp), centred(ref_logp)), TOL_BF16_LOGITS,
                             f"{FORCED_TOKENS} positions, greedy id agreement {agree:.1%}"))
    checks.append(StageCheck("cosyvoice2", "lm greedy id agreement (1 - share)", lm_dtype, 1.0 - agree, None,
                             "near-ties of random weights flip under bf16; reported only"))

    # Flow: the same tokens and prompt, one non-streaming call (the fixed noise is part of the model).
    prompt = (model_input.flow_prompt_speech_token, model_input.prompt_speech_feat, model_input.flow_embedding)
    token_row = tokens.view(1, -1)
    ref_mel = ref.flow.inference(token_row, *prompt)
    dut_mel = dut.flow.inference(token_row.to(dut.device), *(p.to(dut.device) for p in prompt))
    checks.append(StageCheck("cosyvoice2", "flow mel (full call)", flow_dtype, rel_error(dut_mel, ref_mel),
                             TOL_FLOAT32 if flow_dtype == "float32" else TOL_BF16_LOGITS,
                             f"{ref_mel.shape[-1]} frames"))

    # HiFT on the reference mel, without random excitation.
    ref_wav, _ = ref.hift.inference(ref_mel)
    dut_wav, _ = dut.hift.inference(ref_mel.to(dut.device))
    checks.append(StageCheck("cosyvoice2", "hift waveform", "float32", rel_error(dut_wav, ref_wav), TOL_FLOAT32,
                             f"{ref_wav.shape[-1]} samples"))

    # The streaming vocoding path as serving runs it (incremental flow, chunk schedule, HiFT caches).
    streamed = []
    for backend in (ref, dut):
        session = backend.token2wav.new_stream(*(p.to(backend.device) for p in prompt), seed=0)
        pieces = session.push(tokens.to(backend.device)) + [session.finish()]
        streamed.append(torch.cat([p.float().cpu().reshape(-1) for p in pieces]))
    checks.append(StageCheck("cosyvoice2", "streamed audio (flow + HiFT chunks)", flow_dtype,
                             rel_error(streamed[1], streamed[0]),
                             TOL_FLOAT32 if flow_dtype == "float32" else TOL_BF16_LOGITS,
                             f"{streamed[0].numel()} samples"))
    return checks


@torch.inference_mode()
def check_fish(model_dir: Path, device: str) -> list[StageCheck]:
    from cosyapp.backends.fish.backend import FishBackend
    from cosyapp.backends.fish.prompt import Reference, build_prompt

    ref = FishBackend(model_dir, device="cpu", dtype="float32", max_streams=1)
    dut = FishBackend(model_dir, device=device, max_streams=1)
    dtype = str(dut.model.output.weight.dtype).removeprefix("torch.")
    codes = ref.encode_reference(harmonic_tone(44100), 44100)
    grid = build_prompt(ref.tokenizer, "The quick brown fox jumps over the lazy dog.", [Reference(codes, "hello")],
                        ref.model.config.num_codebooks)
    ref_logits, _ = ref.model(grid[None])
    dut_logits, _ = dut.model(grid[None].to(dut.device))
    checks = [StageCheck("fish", "slow transformer (centred logits)", dtype,
                         rel_error(centred(dut_logits[0].float()), centred(ref_logits[0])), TOL_BF16_LOGITS,
                         f"{grid.shape[-1]} positions")]
    # Valid codes for every codebook: the residual books are the smaller ones.
    frames = torch.randint(0, min(ref.codec.cfg.semantic_codebook_size, ref.codec.cfg.residual_codebook_size),
                           (1, ref.model.config.num_codebooks, 64), generator=torch.Generator().manual_seed(0))
    ref_audio = ref.codec.decode(frames)
    dut_audio = dut.codec.decode(frames.to(dut.device))
    checks.append(StageCheck("fish", "codec decode", "float32", rel_error(dut_audio, ref_audio), TOL_FLOAT32,
                             f"{frames.shape[-1]} frames"))
    return checks


def run_device_check(cosyvoice2_dir: Path | None, fish_dir: Path | None, device: str) -> dict[str, Any]:
    checks: list[StageCheck] = []
    if cosyvoice2_dir is not None:
        checks += check_cosyvoice2(cosyvoice2_dir, device)
    if fish_dir is not None:
        checks += check_fish(fish_dir, device)
    rows = [{**asdict(check), "passed": check.passed} for check in checks]
    return {"device": device, "checks": rows, "passed": all(check.passed for check in checks)}


def format_device_check(report: dict[str, Any]) -> str:
    lines = [f"{report['device']} against CPU float32, relative L2 error per stage:",
             f"  {'backend':10} {'stage':42} {'precision':9} {'error':>10} {'tolerance':>9}  result"]
    for row in report["checks"]:
        tolerance = "-" if row["tolerance"] is None else f"{row['tolerance']:.0e}"
        result = "reported" if row["tolerance"] is None else ("ok" if row["passed"] else "FAIL")
        lines.append(f"  {row['backend']:10} {row['stage']:42} {row['precision']:9} {row['rel_error']:10.2e} "
                     f"{tolerance:>9}  {result}  {row['detail']}")
    lines.append("all stages within tolerance" if report["passed"] else "SOME STAGES ARE OUT OF TOLERANCE")
    return "\n".join(lines)
