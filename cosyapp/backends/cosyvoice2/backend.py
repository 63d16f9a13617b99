"""The CosyVoice2 backend: frontend -> LM -> flow -> HiFT behind the engine's `Backend` interface.

One object per loaded model, shared by every request. Request state (LM cache row, sampling generator,
streaming schedule, HiFT caches) lives in per-stream states of the model runner (runner.py), which the engine's
core loop owns, never on the shared object, so concurrent streams cannot disturb each other (upstream's shared
`token_hop_len` bug cannot happen here). `synthesize` runs one request alone through the same runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from cosyapp.accel.trt import load_trt_estimator
from cosyapp.backends.cosyvoice2.config import CosyVoice2Config
from cosyapp.backends.cosyvoice2.decode_graphs import StaticDecodeStep
from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow
from cosyapp.backends.cosyvoice2.frontend import CosyVoice2Frontend, VoiceFeatures
from cosyapp.backends.cosyvoice2.hift import HiFTGenerator
from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM
from cosyapp.backends.cosyvoice2.lm_weights import use_lm_weights
from cosyapp.backends.cosyvoice2.make_tiny import make_tiny as _make_tiny
from cosyapp.backends.cosyvoice2.runner import CosyVoiceRunner
from cosyapp.backends.cosyvoice2.token2wav import Token2Wav, Token2WavStream
from cosyapp.backends.weights import resolve_device, resolve_dtype
from cosyapp.engine.core import run_alone
from cosyapp.engine.types import BackendInfo, InputError, Mode, ModelFileError, SynthesisRequest, Voice

MODEL_TYPE = "CosyVoice2"
END_OF_PROMPT = "<|endofprompt|>"
REQUIRED_FILES = ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx",
                  "CosyVoice-BlankEN/config.json", "CosyVoice-BlankEN/vocab.json", "CosyVoice-BlankEN/merges.txt",
                  "CosyVoice-BlankEN/tokenizer_config.json")
# LM positions per stream: prompt text + text + prompt speech tokens (<= 30 s = 750) + 20x a sentence's tokens.
DEFAULT_LM_CONTEXT = 4096
# Prompt + sentence lengths whose flow position tables are computed at load: a 30 s prompt (750 tokens) and a
# 60 s sentence. Longer ones still work; their tables grow when first needed.
RESERVED_FLOW_TOKENS = 2250


class CosyVoice2Backend:
    name = "cosyvoice2"
    model_type = MODEL_TYPE
    # Closes an instruct2 instruction: the model was trained with it, and users often leave it off.
    instruction_end: str | None = END_OF_PROMPT

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto", max_streams: int = 8,
                 lm_context: int = DEFAULT_LM_CONTEXT, text_frontend: str = "offline",
                 random_source: bool = True, incremental_flow: bool = True,
                 exact_final: bool = False, flow_left_chunks: int = 8, tensorrt: bool = True,
                 cuda_graphs: bool = True, lm_weights: str = "auto") -> None:
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.config = CosyVoice2Config.from_model_dir(self.model_dir)
        self.frontend = CosyVoice2Frontend(self.model_dir, self.config, self.device, text_frontend=text_frontend)
        self.llm = CosyVoice2LM.from_pretrained(self.model_dir, self.config, self.device,
                                                resolve_dtype(dtype, self.device))
        # int8 decoder weights on the CPU when the LM is large enough for them to pay (lm_weights.py).
        self.lm_weights = use_lm_weights(self.llm, lm_weights)
        self.llm.setup_cache(max_streams, lm_context)
        self.flow = CosyVoice2Flow.from_pretrained(self.model_dir, self.config, self.device)
        self.flow.encoder.reserve_positions(RESERVED_FLOW_TOKENS)
        # TensorRT engines built by `cosyapp models build-trt` for this GPU, when present and they agree
        # with torch; the torch estimator otherwise (CPU, no TensorRT, no plan, failed check).
        self.trt_estimator = load_trt_estimator(self.flow, self.model_dir) if tensorrt else None
        self.hift = HiFTGenerator.from_pretrained(self.model_dir, self.config, self.device)
        # Serving draws fresh noise per request; upstream's draw order only matters for reproducing its seeds.
        self.hift.m_source.upstream_noise_order = False
        # A GPU batches streams wherever they are in their schedules (a batched call costs about one stream's);
        # on a CPU, where the flow is compute-bound, padding rows to one length would cost more than it saves.
        self.token2wav = Token2Wav(self.flow, self.hift, self.config, random_source=random_source,
                                   incremental_flow=incremental_flow, exact_final=exact_final,
                                   flow_left_chunks=flow_left_chunks, batch_positions=self.device.type == "cuda")
        self.lm_context = lm_context
        # The engine's core loop decodes every stream's LM row in one forward per step; on a GPU that step replays
        # CUDA graphs (eager on the CPU, or with cuda_graphs=False).
        static_step = StaticDecodeStep(self.llm) if cuda_graphs and self.device.type == "cuda" else None
        # On a GPU the LM decodes up to one full chunk ahead of each stream's vocoding (its steps overlap the
        # vocoder's kernels); on a CPU they compete for the same cores, so a stream waits while it vocodes.
        run_ahead = 0 if self.device.type == "cpu" else self.token2wav.max_hop + self.token2wav.pre_lookahead
        self.runner = CosyVoiceRunner(self, max_streams, static_step, run_ahead)
        self.stream_runner = self.runner  # what the engine's core drives: the model runner speaks its protocol

    def info(self) -> BackendInfo:
        return BackendInfo(model_type=self.model_type, model_dir=str(self.model_dir),
                           sample_rate=self.config.sample_rate, modes=tuple(m.value for m in Mode), instruct=True,
                           lm_weights=self.lm_weights)

    def parse_options(self, values: Mapping[str, Any] | None) -> None:
        """The model samples as it was trained to: it takes no request options."""
        if values:
            raise InputError(f"unknown {self.model_type} options {sorted(values)}: the model takes none")
        return None

    # ---- voices -----------------------------------------------------------------------------------

    def prepare_voice(self, audio: np.ndarray, sample_rate: int, text: str | None = None) -> Voice:
        features = self.frontend.extract_voice(audio, sample_rate)
        return Voice(backend=self.name, features=features, text=text or None,
                     duration_s=float(np.asarray(audio).shape[-1]) / sample_rate)

    def voice_state(self, voice: Voice) -> dict[str, Any]:
        f = self._features(voice)
        return {"speech_token": f.speech_token.cpu(), "speech_feat": f.speech_feat.cpu(),
                "embedding": f.embedding.cpu(), "duration_s": voice.duration_s}

    def voice_from_state(self, state: dict[str, Any], text: str | None) -> Voice:
        try:
            features = VoiceFeatures(state["speech_token"], state["speech_feat"], state["embedding"]).to(self.device)
        except KeyError as exc:
            raise ModelFileError(f"stored voice features lack {exc.args[0]!r}") from exc
        return Voice(backend=self.name, features=features, text=text, duration_s=float(state.get("duration_s", 0.0)))

    def _features(self, voice: Voice) -> VoiceFeatures:
        if voice.backend != self.name or not isinstance(voice.features, VoiceFeatures):
            raise InputError(f"voice was prepared by the {voice.backend} backend, not {self.name}")
        return voice.features

    # ---- synthesis --------------------------------------------------------------------------------

    def _prompt_ids(self, request: SynthesisRequest) -> list[int] | None:
        if request.mode is Mode.ZERO_SHOT:
            prompt_text = request.prompt_text or request.voice.text
            if not prompt_text or not prompt_text.strip():
                raise InputError("zero_shot mode needs prompt_text (the transcript of the prompt recording)")
            return self.frontend.prompt_text_ids(prompt_text)
        if request.mode is Mode.INSTRUCT2:
            instruction = (request.instruction or "").strip()
            if not instruction:
                raise InputError("instruct2 mode needs an instruction")
            if self.instruction_end is not None and not instruction.endswith(self.instruction_end):
                instruction += self.instruction_end
            return self.frontend.instruction_ids(instruction)
        return None

    def new_session(self, model_input: Any, request: SynthesisRequest) -> Token2WavStream:
        """The token2wav state of one sentence (runner.py)."""
        return self.token2wav.new_stream(model_input.flow_prompt_speech_token, model_input.prompt_speech_feat,
                                         model_input.flow_embedding, stream=request.stream, seed=request.seed)

    def token_filter(self) -> None:
        """Every CosyVoice2 token reaches the vocoder."""
        return None

    def synthesize(self, request: SynthesisRequest) -> Iterator[np.ndarray]:
        """Yield float32 24 kHz chunks: several per sentence when streaming, one waveform otherwise. One request
        alone on the calling thread, through the runner the engine uses (engine/core.py `run_alone`)."""
        return run_alone(self.stream_runner, request, self.config.sample_rate)


def load(model_dir: Path, device: str = "auto", dtype: str = "auto", **options: Any) -> CosyVoice2Backend:
    return CosyVoice2Backend(model_dir, device=device, dtype=dtype, **options)


def verify(model_dir: Path) -> list[str]:
    """Check the official layout file by file, then load every stage on the CPU. Raises ModelFileError."""
    return verify_layout(Path(model_dir), REQUIRED_FILES, CosyVoice2Backend, "speech_tokenizer_v2.onnx")


def verify_layout(model_dir: Path, required_files: tuple[str, ...], backend_class: type,
                  speech_tokenizer: str) -> list[str]:
    """The files of a CosyVoice-family directory, then `backend_class` loaded from it on the CPU -> report lines.
    Raises ModelFileError naming what is missing or broken."""
    if not model_dir.is_dir():
        raise ModelFileError(f"{model_dir}: not a directory")
    missing = [name for name in required_files if not (model_dir / name).is_file()]
    if missing:
        raise ModelFileError(f"{model_dir}: missing {', '.join(missing)}")
    report = [f"{name}: present ({(model_dir / name).stat().st_size:,} bytes)" for name in required_files]
    backend = backend_class(model_dir, device="cpu", dtype="float32", max_streams=1, lm_context=256)
    qwen = backend.config.llm.qwen
    report.append(f"llm.pt: loaded (Qwen2 {qwen.num_layers} layers x {qwen.hidden_size}, vocab {qwen.vocab_size})")
    report.append(f"flow.pt: loaded ({sum(p.numel() for p in backend.flow.parameters()):,} parameters)")
    report.append(f"hift.pt: loaded ({sum(p.numel() for p in backend.hift.parameters()):,} parameters)")
    report.append(f"campplus.onnx, {speech_tokenizer}: loaded with onnxruntime")
    return report


def make_tiny(out_dir: Path, size: str = "tiny") -> None:
    _make_tiny(out_dir, size=size)
