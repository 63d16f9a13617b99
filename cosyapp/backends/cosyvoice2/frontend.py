"""CosyVoice2 frontend: text and prompt audio -> the tensors the LLM and the flow model consume.

Upstream (`CosyVoiceFrontEnd`) re-reads and re-analyses the prompt wav for every sentence. Here a voice is
analysed once (`extract_voice`) and its `VoiceFeatures` are reused; text is normalised and split into
sentences (`text_sentences`), and `build_model_input` assembles the per-sentence `ModelInput` exactly as
upstream's `frontend_zero_shot` / `frontend_cross_lingual` / `frontend_instruct2` do.

Prompt audio is accepted at any sample rate from 8 kHz up (upstream asserts >= 16 kHz): it is resampled
to 16 kHz (speech tokens, speaker embedding) and to 24 kHz (prompt mel) with torchaudio's default
windowed-sinc filter, the same one upstream's `load_wav` uses. Below 16 kHz the prompt simply carries no
high band, which the models tolerate; refusing such uploads would only push users to upsample first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from cosyapp.backends.cosyvoice2.config import CosyVoice2Config
from cosyapp.backends.cosyvoice2.features import prompt_mel, resample, speaker_fbank, whisper_log_mel
from cosyapp.backends.cosyvoice2.text import FstNormalizer, WetextNormalizer, normalize_sentences, normalize_whole
from cosyapp.backends.cosyvoice2.tokenizer import CosyVoice2Tokenizer
from cosyapp.engine.types import InputError, Mode, ModelFileError

TOKENIZER_SAMPLE_RATE = 16000  # speech tokenizer and CAM++ input rate
MIN_PROMPT_SECONDS = 0.5
MAX_PROMPT_SECONDS = 30.0  # upstream's limit for the speech tokenizer
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 384000
# torchaudio's resampler builds a polyphase kernel of (target/g) x (source/g) taps, g = gcd of the rates;
# an odd rate from a crafted header (44101 Hz) would make that gigabytes. Real rates stay far below this.
MAX_RESAMPLE_RATIO_TERM = 1000


@dataclass
class VoiceFeatures:
    """Everything CosyVoice2 needs from a prompt recording, computed once per voice.

    Trimmed so that `speech_feat` has exactly token_mel_ratio (2) frames per speech token.
    """

    speech_token: torch.Tensor  # [1, P] int64, 25 Hz speech tokens
    speech_feat: torch.Tensor  # [1, 2P, 80] float32, 50 Hz log-mel of the 24 kHz prompt
    embedding: torch.Tensor  # [1, 192] float32, raw CAM++ x-vector (flow normalises it)

    def to(self, device: torch.device | str) -> "VoiceFeatures":
        return VoiceFeatures(self.speech_token.to(device), self.speech_feat.to(device), self.embedding.to(device))


@dataclass
class ModelInput:
    """One sentence's model inputs, upstream's `model_input` dict as fields (integer tensors are int64).

    The LLM reads `text`, `prompt_text` and `llm_prompt_speech_token`; flow reads `flow_prompt_speech_token`,
    `prompt_speech_feat` and `flow_embedding`. `llm_embedding` is kept for parity: the CosyVoice2 LM ignores it.
    """

    text: torch.Tensor  # [1, T]
    prompt_text: torch.Tensor  # [1, Tp]; [1, 0] for cross_lingual; the raw instruction for instruct2
    llm_prompt_speech_token: torch.Tensor  # [1, P] for zero_shot, [1, 0] otherwise
    flow_prompt_speech_token: torch.Tensor  # [1, P]
    prompt_speech_feat: torch.Tensor  # [1, 2P, 80]
    flow_embedding: torch.Tensor  # [1, 192]
    llm_embedding: torch.Tensor  # [1, 192], the same tensor as flow_embedding

    @property
    def text_len(self) -> int:
        return self.text.shape[1]

    @property
    def prompt_text_len(self) -> int:
        return self.prompt_text.shape[1]

    @property
    def llm_prompt_speech_token_len(self) -> int:
        return self.llm_prompt_speech_token.shape[1]

    @property
    def flow_prompt_speech_token_len(self) -> int:
        return self.flow_prompt_speech_token.shape[1]

    @property
    def prompt_speech_feat_len(self) -> int:
        return self.prompt_speech_feat.shape[1]


def _onnx_session(path: Path, providers: list, n_inputs: int) -> ort.InferenceSession:
    if not path.is_file():
        raise ModelFileError(f"{path}: missing")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Upstream runs both models with one intra-op thread; we keep it for identical numerics (CAM++ on
    # the CPU is small, and the speech tokenizer runs on the GPU where there is one).
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own unrelated exception types for bad files
        raise ModelFileError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from exc
    if len(session.get_inputs()) != n_inputs:
        raise ModelFileError(f"{path}: expected {n_inputs} model input(s), found {len(session.get_inputs())}")
    return session


def _speech_tokenizer_providers(device: torch.device) -> list:
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _as_mono_float(wav: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A [N] float32 CPU tensor from a [N] or [1, N] float array; InputError for anything else."""
    if isinstance(wav, np.ndarray):
        if not np.issubdtype(wav.dtype, np.floating):
            raise InputError(f"prompt audio must be float samples in [-1, 1], got {wav.dtype}")
        wav = torch.from_numpy(np.ascontiguousarray(wav))
    elif not isinstance(wav, torch.Tensor):
        raise InputError(f"prompt audio must be a numpy array or a torch tensor, got {type(wav).__name__}")
    if not wav.is_floating_point():
        raise InputError(f"prompt audio must be float samples in [-1, 1], got {wav.dtype}")
    if wav.dim() == 2 and wav.shape[0] == 1:
        wav = wav[0]
    if wav.dim() != 1:
        raise InputError(f"prompt audio must be mono ([N] or [1, N] samples), got shape {list(wav.shape)}")
    return wav.detach().to("cpu", torch.float32)


def _check_sample_rate(sample_rate: int, target_rates: tuple[int, ...]) -> None:
    if not isinstance(sample_rate, (int, np.integer)) or not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise InputError(f"prompt sample rate must be an integer from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz, "
                         f"got {sample_rate!r}")
    for target in target_rates:
        g = math.gcd(int(sample_rate), target)
        if sample_rate // g > MAX_RESAMPLE_RATIO_TERM or target // g > MAX_RESAMPLE_RATIO_TERM:
            raise InputError(f"unsupported prompt sample rate {sample_rate} Hz (cannot resample it to {target} Hz "
                             "efficiently); use a standard rate such as 16000, 22050, 24000, 44100 or 48000")


class CosyVoice2Frontend:
    """Tokenizer + speech tokenizer + speaker model of a CosyVoice2 model directory.

    `text_frontend`: "offline" (upstream without a TN engine, what the goldens use) or "wetext" (upstream's
    wetext branch; needs the optional `wetext` package and TN FSTs, see `text.WetextNormalizer`).
    Thread-safe: nothing is mutated after construction.
    """

    tokenizer_class: type[CosyVoice2Tokenizer] = CosyVoice2Tokenizer
    speech_tokenizer_file = "speech_tokenizer_v2.onnx"

    def __init__(self, model_dir: str | Path, config: CosyVoice2Config, device: torch.device | str = "cpu",
                 text_frontend: str = "offline", wetext_fst_dir: str | Path | None = None) -> None:
        model_dir = Path(model_dir)
        self.config = config
        self.device = torch.device(device)
        self.tokenizer = self.tokenizer_class(model_dir / "CosyVoice-BlankEN")
        if text_frontend == "offline":
            self._fst: FstNormalizer | None = None
        elif text_frontend == "wetext":
            self._fst = WetextNormalizer(wetext_fst_dir)
        else:
            raise ValueError(f"text_frontend must be 'offline' or 'wetext', got {text_frontend!r}")
        self._speaker_model = _onnx_session(model_dir / "campplus.onnx", ["CPUExecutionProvider"], n_inputs=1)
        self._speech_tokenizer = _onnx_session(model_dir / self.speech_tokenizer_file,
                                               _speech_tokenizer_providers(self.device), n_inputs=2)

    # ---- text -------------------------------------------------------------------------------------

    def text_sentences(self, text: str) -> list[list[int]]:
        """Normalise `text` (split=True) and tokenize each sentence; each is synthesised on its own."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("text is empty (nothing to synthesise)")
        sentences = [self.tokenizer.encode(s) for s in normalize_sentences(text, self.tokenizer.count, self._fst)]
        if not sentences:
            raise InputError("text has nothing to speak (only punctuation or symbols)")
        return sentences

    def prompt_text_ids(self, text: str) -> list[int]:
        """The zero-shot prompt transcript: normalised without splitting, then tokenized."""
        return self.tokenizer.encode(normalize_whole(text, self.tokenizer.count, self._fst))

    def instruction_ids(self, text: str) -> list[int]:
        """The instruct2 instruction, tokenized raw (upstream does not normalise it). It should end with
        `<|endofprompt|>`, e.g. "Speak happily.<|endofprompt|>"."""
        return self.tokenizer.encode(text)

    # ---- voice ------------------------------------------------------------------------------------

    def extract_voice(self, wav: torch.Tensor | np.ndarray, sample_rate: int) -> VoiceFeatures:
        """Speech tokens, prompt mel and speaker embedding of a mono recording in [-1, 1].

        Raises InputError for audio that is empty, not finite, shorter than 0.5 s or longer than 30 s, or
        at an unusable sample rate. Silence is accepted.
        """
        mel_rate = self.config.mel.sampling_rate
        _check_sample_rate(sample_rate, (TOKENIZER_SAMPLE_RATE, mel_rate))
        wav = _as_mono_float(wav)
        if wav.numel() == 0:
            raise InputError("prompt audio is empty")
        seconds = wav.numel() / sample_rate
        if seconds < MIN_PROMPT_SECONDS:
            raise InputError(f"prompt audio is {seconds:.2f} s long; at least {MIN_PROMPT_SECONDS} s is needed")
        if seconds > MAX_PROMPT_SECONDS:
            raise InputError(f"prompt audio is {seconds:.1f} s long; at most {MAX_PROMPT_SECONDS:.0f} s is supported")
        if not bool(torch.isfinite(wav).all()):
            raise InputError("prompt audio contains NaN or infinite samples")

        # Prompts are short and both ONNX models take host arrays, so the features are computed on the CPU.
        wav_16k = resample(wav, int(sample_rate), TOKENIZER_SAMPLE_RATE)
        speech_token = self._speech_tokens(whisper_log_mel(wav_16k))
        embedding = self._speaker_embedding(speaker_fbank(wav_16k))
        speech_feat = prompt_mel(resample(wav, int(sample_rate), mel_rate), self.config.mel)

        # Flow needs exactly token_mel_ratio mel frames per prompt token: trim whichever is longer.
        ratio = self.config.token_mel_ratio
        token_len = min(speech_feat.shape[0] // ratio, speech_token.shape[0])
        return VoiceFeatures(
            speech_token=speech_token[:token_len].unsqueeze(0).to(self.device),
            speech_feat=speech_feat[:ratio * token_len].unsqueeze(0).to(self.device),
            embedding=embedding.unsqueeze(0).to(self.device),
        )

    def _speech_tokens(self, log_mel: torch.Tensor) -> torch.Tensor:
        """[128, T] whisper log-mel -> [~T/4] int64 speech tokens."""
        feats_name, length_name = (i.name for i in self._speech_tokenizer.get_inputs())
        tokens = self._speech_tokenizer.run(None, {
            feats_name: log_mel.unsqueeze(0).numpy(),
            length_name: np.array([log_mel.shape[1]], dtype=np.int32),
        })[0]
        return torch.from_numpy(np.asarray(tokens).reshape(-1).astype(np.int64))

    def _speaker_embedding(self, fbank: torch.Tensor) -> torch.Tensor:
        """[frames, 80] mean-normalised fbank -> [192] CAM++ embedding."""
        input_name = self._speaker_model.get_inputs()[0].name
        embedding = self._speaker_model.run(None, {input_name: fbank.unsqueeze(0).numpy()})[0]
        embedding = torch.from_numpy(np.asarray(embedding, dtype=np.float32).reshape(-1))
        if embedding.numel() != self.config.spk_embed_dim:
            raise ModelFileError(f"campplus.onnx: produced {embedding.numel()} values, expected "
                                 f"{self.config.spk_embed_dim} (spk_embed_dim of the model yaml)")
        return embedding

    # ---- assembly ---------------------------------------------------------------------------------

    def build_model_input(self, mode: Mode, text_ids: list[int], voice: VoiceFeatures,
                          prompt_text_ids: list[int] | None = None) -> ModelInput:
        """One sentence's inputs for `mode`.

        zero_shot: `prompt_text_ids` = the normalised prompt transcript (`prompt_text_ids()`); the LLM also
        gets the prompt speech tokens. cross_lingual: no prompt text, no LLM prompt tokens (the voice
        reaches the output only through flow); pass None. instruct2: `prompt_text_ids` = the raw
        instruction (`instruction_ids()`); no LLM prompt tokens.
        """
        mode = Mode(mode)
        if not text_ids:
            raise ValueError("text_ids is empty")
        if mode is Mode.CROSS_LINGUAL:
            if prompt_text_ids is not None:
                raise ValueError("cross_lingual takes no prompt text")
            prompt_text_ids = []
        elif prompt_text_ids is None:
            needed = "the prompt transcript" if mode is Mode.ZERO_SHOT else "the instruction"
            raise ValueError(f"{mode.value} needs prompt_text_ids ({needed})")

        def ids(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device).view(1, -1)

        voice = voice.to(self.device)
        no_tokens = voice.speech_token[:, :0]
        return ModelInput(
            text=ids(text_ids),
            prompt_text=ids(prompt_text_ids),
            llm_prompt_speech_token=voice.speech_token if mode is Mode.ZERO_SHOT else no_tokens,
            flow_prompt_speech_token=voice.speech_token,
            prompt_speech_feat=voice.speech_feat,
            flow_embedding=voice.embedding,
            llm_embedding=voice.embedding,
        )
