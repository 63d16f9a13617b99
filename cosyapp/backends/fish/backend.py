"""The Fish (OpenAudio S1-mini) backend: tokenizer + prompt -> dual-AR frames -> causal codec, behind the
engine's `Backend` interface.

Faithful to S1 (`d3df505`) where the goldens pin it: one prompt for the whole text (`chunk_length` accepted
and ignored), S1 sampler and penalty windows, the last generated frame dropped, codes decoded untrimmed.
Deviations, each harmless to parity:
* streaming decodes incrementally while frames arrive (the codec is causal: same samples within float noise)
  instead of one segment after generation; `stream=False` decodes once at the end like upstream;
* the engine runs every stream through the model runner (runner.py; serving.py has the streaming schedule),
  all streams' frames in one batched forward per step; `synthesize` runs one request alone the same way;
* `generate_frames`, the single-stream reference loop, checks the stop token every `check_every` frames
  (frames past it are discarded: same output);
* code 0 is clamped to the codebook (upstream would crash on a sampled vocabulary-padding id);
* `max_new_tokens=1` is an InputError (upstream raises UnboundLocalError);
* `penalty_main_history=True` (load option) penalises the main token with its own history instead of S1's
  one-frame slice; off by default.

Request options (`FishOptions`, parsed once by `parse_options`): temperature, top_p, repetition_penalty,
max_new_tokens, chunk_length.
Modes: zero_shot (reference codes + transcripts) and cross_lingual (reference codes, empty transcripts).
A voice holds zero or more references; zero references = the model's own random voice.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torchaudio.functional as AF

from cosyapp.backends.fish.codec import DecodeStream, FishCodec, load_codec
from cosyapp.backends.fish.config import CODEC_FILE, LLM_FILE, MODEL_FILES, SAMPLE_RATE, CodecConfig, DualARConfig
from cosyapp.backends.fish.dual_ar import DualARTransformer, load_dual_ar
from cosyapp.backends.fish.generate import FrameGenerator, SamplingParams, frame_budget, request_generator
from cosyapp.backends.fish.make_tiny import make_tiny as _make_tiny
from cosyapp.backends.fish.prompt import Reference, build_prompt
from cosyapp.backends.fish.runner import FishRunner, FishStreamState
from cosyapp.backends.fish.serving import FishServing
from cosyapp.backends.fish.tokenizer import FishTokenizer
from cosyapp.backends.weights import check_keys, fold_weight_norm, load_state_dict, resolve_device, resolve_dtype
from cosyapp.engine.core import run_alone
from cosyapp.engine.stats import timed
from cosyapp.engine.types import BackendInfo, InputError, Mode, ModelFileError, SynthesisRequest, Voice

MODEL_TYPE = "OpenAudio-S1-mini"
MODES = (Mode.ZERO_SHOT.value, Mode.CROSS_LINGUAL.value)
MAX_REFERENCE_SECONDS = 90.0  # upstream's maintainers' advice; longer references crowd out the text
# Frames the codec decodes at once for /v1/vqgan/decode (about 6 s of audio): the working memory of a
# decode is that of this many frames, however long the grid.
DECODE_FRAMES = 256


@dataclass(frozen=True)
class FishOptions:
    """A request's options, each checked against its range once (`parse_options`): upstream's API ranges, where
    its sampler's asserts are looser (S1 documents and serves these)."""

    temperature: float = 0.8
    top_p: float = 0.8
    repetition_penalty: float = 1.1
    max_new_tokens: int = 1024  # 0: up to the context
    chunk_length: int = 200  # accepted as upstream's API does; S1 speaks the whole text in one prompt


# name -> (low, high) of the real-valued options; the whole-number ones are checked in `parse_options`.
OPTION_RANGES = {"temperature": (0.1, 1.0), "top_p": (0.1, 1.0), "repetition_penalty": (0.9, 2.0)}
CHUNK_LENGTHS = (100, 300)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a number; got {value!r}")
    low, high = OPTION_RANGES[name]
    if not low <= value <= high:
        raise InputError(f"{name} must be from {low:g} to {high:g}; got {value!r}")
    return float(value)


def _whole(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer; got {value!r}")
    return value


def parse_options(values: Mapping[str, Any] | None) -> FishOptions:
    """Request options by name -> FishOptions; InputError naming the first bad one."""
    values = dict(values or {})
    known = tuple(field.name for field in fields(FishOptions))
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"unknown Fish options {unknown}; known: {', '.join(known)}")
    parsed = {name: _number(name, values[name]) for name in OPTION_RANGES if name in values}
    if "max_new_tokens" in values:
        max_new_tokens = _whole("max_new_tokens", values["max_new_tokens"])
        if max_new_tokens < 0 or max_new_tokens == 1:
            raise InputError(f"max_new_tokens must be 0 (up to the context) or an integer >= 2; got {max_new_tokens}")
        parsed["max_new_tokens"] = max_new_tokens
    if "chunk_length" in values:
        chunk_length = _whole("chunk_length", values["chunk_length"])
        if not CHUNK_LENGTHS[0] <= chunk_length <= CHUNK_LENGTHS[1]:
            raise InputError(f"chunk_length must be from {CHUNK_LENGTHS[0]} to {CHUNK_LENGTHS[1]}; got {chunk_length}")
        parsed["chunk_length"] = chunk_length
    return FishOptions(**parsed)


def resample_to_codec_rate(audio: np.ndarray, sample_rate: int) -> torch.Tensor:
    """Mono float32 -> 44.1 kHz tensor (torchaudio's default sinc resampler, as S1's reference loader)."""
    wav = torch.as_tensor(np.ascontiguousarray(audio, dtype=np.float32))
    if sample_rate != SAMPLE_RATE:
        wav = AF.resample(wav, sample_rate, SAMPLE_RATE)
    return wav


class FishBackend:
    name = "fish"

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto", max_streams: int = 2,
                 check_every: int = 4, penalty_main_history: bool = False) -> None:
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.tokenizer = FishTokenizer.from_model_dir(self.model_dir)
        self.model: DualARTransformer = load_dual_ar(self.model_dir, self.tokenizer.semantic_begin_id,
                                                     self.tokenizer.semantic_end_id, self.device,
                                                     resolve_dtype(dtype, self.device))
        if self.model.config.vocab_size < self.tokenizer.vocab_size:
            raise ModelFileError(f"{self.model_dir / 'config.json'}: vocab_size {self.model.config.vocab_size} is "
                                 f"smaller than the tokenizer's {self.tokenizer.vocab_size} ids")
        self.model.setup_caches(max_streams)
        self.codec: FishCodec = load_codec(self.model_dir / CODEC_FILE, self.device)
        self.check_every = check_every
        self.penalty_main_history = penalty_main_history
        self.runner = FishRunner(self.model, self.codec, penalty_main_history)
        # What the engine's core loop drives: the runner's calls on the streaming schedule (serving.py). Each stream
        # owns one row of the transformer's KV caches for its whole request (the core's row pool).
        self.stream_runner = FishServing(self)

    def info(self) -> BackendInfo:
        return BackendInfo(model_type=MODEL_TYPE, model_dir=str(self.model_dir), sample_rate=SAMPLE_RATE, modes=MODES,
                           reference_voices=True, codec_codebooks=self.model.config.num_codebooks,
                           options=tuple(field.name for field in fields(FishOptions)))

    def parse_options(self, values: Mapping[str, Any] | None) -> FishOptions:
        return parse_options(values)

    # ---- voices -----------------------------------------------------------------------------------

    def encode_reference(self, audio: np.ndarray, sample_rate: int) -> torch.Tensor:
        """Mono float32 recording -> codec codes `[10, ceil(n / 2048)]` (int64, CPU)."""
        audio = np.asarray(audio)
        if audio.ndim != 1 or audio.size == 0:
            raise InputError("the reference recording must be non-empty mono audio")
        if audio.size / sample_rate > MAX_REFERENCE_SECONDS:
            raise InputError(f"the reference recording is longer than {MAX_REFERENCE_SECONDS:.0f} s")
        if not np.isfinite(audio).all():
            raise InputError("the reference recording contains NaN or infinite samples")
        wav = resample_to_codec_rate(audio, sample_rate).to(self.device)
        return self.codec.encode(wav[None, None])[0].cpu()

    def prepare_voice(self, audio: np.ndarray, sample_rate: int, text: str | None = None) -> Voice:
        codes = self.encode_reference(audio, sample_rate)
        return Voice(backend=self.name, features=[Reference(codes, text or "")], text=text,
                     duration_s=len(audio) / sample_rate)

    def no_reference_voice(self) -> Voice:
        """A voice without references: S1 then speaks in a voice of its own choosing (seed-dependent)."""
        return Voice(backend=self.name, features=[], text=None)

    def combine_voices(self, voices: Sequence[Voice], texts: Sequence[str]) -> Voice:
        """One voice of the references of `voices`, in order, the i-th reference read as `texts[i]`."""
        codes = [ref.codes for voice in voices for ref in voice.features]
        return self.voice_from_state({"codes": codes, "texts": list(texts)}, None)

    # ---- codec ------------------------------------------------------------------------------------

    def encode_codes(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        return self.encode_reference(audio, sample_rate).numpy()

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        """Audio of a code grid `[codebooks, frames]`, decoded DECODE_FRAMES at a time with the streaming decoder
        (the codec is causal: the same samples within float noise), so its working memory does not grow with the
        grid's length."""
        grid = torch.as_tensor(np.asarray(codes, dtype=np.int64), device=self.device)
        stream = DecodeStream(self.codec)
        pieces = [stream.push(grid[None, :, start:start + DECODE_FRAMES])[0, 0].float().cpu().numpy()
                  for start in range(0, grid.shape[1], DECODE_FRAMES)]
        return np.concatenate(pieces)

    def voice_state(self, voice: Voice) -> dict[str, Any]:
        return {"codes": [ref.codes for ref in voice.features], "texts": [ref.text for ref in voice.features]}

    def voice_from_state(self, state: dict[str, Any], text: str | None) -> Voice:
        codes, texts = list(state["codes"]), list(state["texts"])
        if text is not None and len(codes) == 1:
            texts = [text]
        n_codebooks = self.model.config.num_codebooks
        references = []
        for c, t in zip(codes, texts):
            c = torch.as_tensor(c, dtype=torch.long)
            if c.dim() != 2 or c.shape[0] != n_codebooks:
                raise InputError(f"stored Fish voice codes must be [{n_codebooks}, T], got {tuple(c.shape)}")
            references.append(Reference(c, t))
        frames = sum(ref.codes.shape[1] for ref in references)
        return Voice(backend=self.name, features=references, text=texts[0] if len(texts) == 1 else None,
                     duration_s=frames * self.codec.cfg.frame_length / SAMPLE_RATE)

    # ---- synthesis --------------------------------------------------------------------------------

    def prompt_for(self, request: SynthesisRequest) -> torch.Tensor:
        """The S1 prompt grid for a request; InputError for what Fish cannot do."""
        if request.instruction:
            raise InputError("Fish (OpenAudio S1) does not support instructions; send a reference voice instead")
        if request.mode not in (Mode.ZERO_SHOT, Mode.CROSS_LINGUAL):
            raise InputError(f"Fish supports the modes {', '.join(MODES)}, not {request.mode.value}")
        if not request.text.strip():
            raise InputError("the text is empty")
        references: list[Reference] = list(request.voice.features or [])
        if request.mode == Mode.CROSS_LINGUAL:
            references = [Reference(ref.codes, "") for ref in references]
        elif request.prompt_text is not None and len(references) == 1:
            references = [Reference(references[0].codes, request.prompt_text)]
        return build_prompt(self.tokenizer, request.text, references, self.model.config.num_codebooks)

    def plan_stream(self, request: SynthesisRequest) -> tuple[torch.Tensor, SamplingParams, int, int | None]:
        """A request's prompt grid, sampling settings, frame budget and stop id (None for a fixed length, whose
        stop token is ignored); InputError for what Fish cannot do."""
        prompt = self.prompt_for(request)
        options = request.options if isinstance(request.options, FishOptions) else parse_options(request.options)
        params = SamplingParams(temperature=options.temperature, top_p=options.top_p,
                                repetition_penalty=options.repetition_penalty, max_new_tokens=options.max_new_tokens,
                                penalty_main_history=self.penalty_main_history)
        if request.fixed_length is not None and request.fixed_length < 1:
            raise InputError(f"fixed_length must be >= 1, got {request.fixed_length}")
        max_new = request.fixed_length if request.fixed_length is not None else params.max_new_tokens
        try:
            budget = frame_budget(prompt.shape[-1], max_new, self.model.config.max_seq_len)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if request.fixed_length is not None and budget < request.fixed_length:
            raise InputError(f"fixed_length {request.fixed_length} does not fit the context ({budget} frames left)")
        stop_id = None if request.fixed_length is not None else self.tokenizer.im_end_id
        return prompt, params, budget, stop_id

    def start_stream(self, request: SynthesisRequest, row: int) -> FishStreamState:
        """The runner state of a request on KV-cache row `row` (taken from the caller's pool of
        `self.runner.rows`); InputError for what Fish cannot do. No model work happens here."""
        prompt, params, budget, stop_id = self.plan_stream(request)
        return self.runner.start(row, prompt, params, request_generator(request.seed, self.device), budget, stop_id)

    def generate_frames(self, request: SynthesisRequest) -> Iterator[torch.Tensor]:
        """Yield the generated frames `[11, n]` block by block (device tensors), the last frame included: S1's
        loop for one stream alone, on cache row 0 (the reference the batched runner is checked against; not
        to be mixed with a running engine).

        With `request.fixed_length` exactly that many frames are generated and the stop token is ignored."""
        prompt, params, budget, stop_id = self.plan_stream(request)
        generator = request_generator(request.seed, self.device)
        frames = FrameGenerator(self.model, params, generator, fast_width=self.codec.cfg.residual_codebook_size,
                                row=0)
        blocks = frames.frames(prompt, budget, stop_id, self.check_every, request.cancel)
        while True:
            with timed(request.stats, "fish_lm"):
                block = next(blocks, None)
            if block is None:
                break
            yield block

    def decode_frames(self, state: FishStreamState) -> np.ndarray:
        """All of a finished stream's usable codes in one codec call (S1's single segment) -> float32 audio."""
        produced = state.produced - 1 if state.drop_last else state.produced
        if produced <= 0:
            return np.zeros(0, np.float32)
        return self.codec.decode(state.frames[None, 1:, :produced])[0, 0].float().cpu().numpy()

    def synthesize(self, request: SynthesisRequest) -> Iterator[np.ndarray]:
        """Yield float32 mono chunks at 44.1 kHz: incrementally while generating when `request.stream`, else
        one chunk decoded at the end (upstream's single segment). One request alone on the calling thread,
        through the runner the engine uses (engine/core.py `run_alone`)."""
        return run_alone(self.stream_runner, request, SAMPLE_RATE)


def load(model_dir: Path, device: str = "auto", dtype: str = "auto", **options: Any) -> FishBackend:
    return FishBackend(model_dir, device=device, dtype=dtype, **options)


def _check_keys_on_meta(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Names and shapes only: loading into meta parameters copies nothing (torch warns about that; expected)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        check_keys(module, state, source)


def verify(model_dir: Path) -> list[str]:
    """Check the release layout file by file and that every checkpoint matches its config (on the meta device,
    so it costs no weight memory). Raises ModelFileError naming the bad file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFileError(f"{model_dir}: not a directory")
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise ModelFileError(f"{model_dir}: missing {', '.join(missing)}")
    report = [f"{name}: present ({(model_dir / name).stat().st_size:,} bytes)" for name in MODEL_FILES]
    config = DualARConfig.from_model_dir(model_dir)
    report.append(f"config.json: dual_ar, {config.n_layer} slow + {config.n_fast_layer} fast layers, dim {config.dim}, "
                  f"vocab {config.vocab_size}, context {config.max_seq_len}")
    tokenizer = FishTokenizer.from_model_dir(model_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelFileError(f"{model_dir / 'special_tokens.json'}: {tokenizer.vocab_size} ids do not fit "
                             f"vocab_size {config.vocab_size}")
    report.append(f"tokenizer: {tokenizer.n_ranks} BPE ranks + {len(tokenizer.special_ids)} special tokens "
                  f"(semantic ids {tokenizer.semantic_begin_id}..{tokenizer.semantic_end_id}, "
                  f"<|im_end|> {tokenizer.im_end_id})")
    llm_state = load_state_dict(model_dir / LLM_FILE)
    with torch.device("meta"):
        model = DualARTransformer(config, tokenizer.semantic_begin_id, tokenizer.semantic_end_id)
    _check_keys_on_meta(model, llm_state, str(model_dir / LLM_FILE))
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in llm_state.values()})
    report.append(f"model.pth: all {len(llm_state)} keys match "
                  f"({sum(v.numel() for v in llm_state.values()) / 1e6:.1f}M parameters, {'/'.join(dtypes)})")
    codec_state = load_state_dict(model_dir / CODEC_FILE)
    codec_cfg = CodecConfig.from_state_dict(codec_state, str(model_dir / CODEC_FILE))
    folded = fold_weight_norm({k: v for k, v in codec_state.items() if not k.endswith((".freqs_cis", ".causal_mask"))})
    with torch.device("meta"):
        codec = FishCodec(codec_cfg)
    _check_keys_on_meta(codec, folded, str(model_dir / CODEC_FILE))
    report.append(f"codec.pth: all keys match ({sum(v.numel() for v in folded.values()) / 1e6:.1f}M parameters; "
                  f"latent {codec_cfg.latent_dim}, decoder {codec_cfg.decoder_dim}, "
                  f"{codec_cfg.frame_length} samples per frame)")
    return report


def make_tiny(out_dir: Path, size: str = "tiny") -> None:
    _make_tiny(out_dir, size=size)
