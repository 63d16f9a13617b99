"""The CosyVoice3 backend: frontend -> LM (+ silence cap) -> flow -> causal HiFT behind the engine's `Backend`.

One object per loaded model, shared by every request; request state (LM cache row, sampling generator,
streaming schedule, flow caches, mel and sample offsets) lives in per-stream states of CosyVoice2's model runner
(cosyvoice2/runner.py), which the engine's core loop owns: the LM rows of all streams decode in one forward per
step, each stream's chunks are vocoded one stream at a time. Streaming chunks cost what they add
(`token2wav.py`), unless `exact_streaming` asks for upstream's re-run of the whole utterance per chunk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cosyapp.backends.cosyvoice2.backend import CosyVoice2Backend, verify_layout
from cosyapp.backends.cosyvoice2.lm_weights import use_lm_weights
from cosyapp.backends.cosyvoice2.runner import CosyVoiceRunner
from cosyapp.backends.cosyvoice3.config import CONFIG_FILE, CosyVoice3Config
from cosyapp.backends.cosyvoice3.flow import CosyVoice3Flow
from cosyapp.backends.cosyvoice3.frontend import CosyVoice3Frontend
from cosyapp.backends.cosyvoice3.hift import CausalHiFTGenerator
from cosyapp.backends.cosyvoice3.decoding import SilenceCap
from cosyapp.backends.cosyvoice3.llm import CosyVoice3LM
from cosyapp.backends.cosyvoice3.make_tiny import make_tiny as _make_tiny
from cosyapp.backends.cosyvoice3.token2wav import Token2Wav, Token2WavStream
from cosyapp.backends.weights import resolve_device, resolve_dtype
from cosyapp.engine.types import SynthesisRequest

MODEL_TYPE = "CosyVoice3"
REQUIRED_FILES = (CONFIG_FILE, "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v3.onnx",
                  "CosyVoice-BlankEN/config.json", "CosyVoice-BlankEN/vocab.json", "CosyVoice-BlankEN/merges.txt",
                  "CosyVoice-BlankEN/tokenizer_config.json")
# LM positions per stream: prompt text + text + prompt speech tokens (<= 30 s = 750) + 20x a sentence's tokens.
DEFAULT_LM_CONTEXT = 4096


class CosyVoice3Backend:
    name = "cosyvoice3"
    model_type = MODEL_TYPE
    instruction_end: str | None = None  # the instruction is taken as the user wrote it

    # Voices are CosyVoice2's: the same prompt features, stored the same way.
    prepare_voice = CosyVoice2Backend.prepare_voice
    voice_state = CosyVoice2Backend.voice_state
    voice_from_state = CosyVoice2Backend.voice_from_state
    _features = CosyVoice2Backend._features
    # As CosyVoice2: the same modes and prompts, no request options, one request alone through the model runner.
    info = CosyVoice2Backend.info
    parse_options = CosyVoice2Backend.parse_options
    _prompt_ids = CosyVoice2Backend._prompt_ids
    synthesize = CosyVoice2Backend.synthesize

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto", max_streams: int = 8,
                 lm_context: int = DEFAULT_LM_CONTEXT, text_frontend: str = "offline",
                 exact_streaming: bool = False, flow_left_chunks: int = 8, lm_weights: str = "auto") -> None:
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.config = CosyVoice3Config.from_model_dir(self.model_dir)
        self.frontend = CosyVoice3Frontend(self.model_dir, self.config, self.device, text_frontend=text_frontend)
        self.llm = CosyVoice3LM.from_pretrained(self.model_dir, self.config, self.device,
                                                resolve_dtype(dtype, self.device))
        self.lm_weights = use_lm_weights(self.llm, lm_weights)  # as CosyVoice2's (lm_weights.py)
        # Allocated once: generation is capped to fit, so the cache is never reallocated under a running stream.
        self.llm.setup_cache(max_streams, lm_context)
        self.lm_context = lm_context
        self.flow = CosyVoice3Flow.from_pretrained(self.model_dir, self.config, self.device)
        self.hift = CausalHiFTGenerator.from_pretrained(self.model_dir, self.config, self.device)
        # exact_streaming: upstream's chunks (every chunk re-runs the utterance so far); otherwise bounded chunks,
        # whose flow sees the prompt and the last flow_left_chunks chunks (-1: all).
        self.token2wav = Token2Wav(self.flow, self.hift, self.config, exact=exact_streaming,
                                   left_chunks=flow_left_chunks)
        # On a GPU the LM decodes up to one full chunk ahead of each stream's vocoding (see CosyVoice2Backend).
        run_ahead = 0 if self.device.type == "cpu" else self.token2wav.max_hop + self.token2wav.pre_lookahead
        self.runner = CosyVoiceRunner(self, max_streams, run_ahead=run_ahead)
        self.stream_runner = self.runner  # what the engine's core drives (see CosyVoice2Backend)

    def new_session(self, model_input: Any, request: SynthesisRequest) -> Token2WavStream:
        """The token2wav state of one sentence (cosyvoice2/runner.py)."""
        return self.token2wav.new_stream(model_input.flow_prompt_speech_token, model_input.prompt_speech_feat,
                                         model_input.flow_embedding, stream=request.stream)

    def token_filter(self) -> Any:
        """Long runs of silent tokens are cut before the vocoder (a sentence's own `SilenceCap`)."""
        return SilenceCap().keep


def load(model_dir: Path, device: str = "auto", dtype: str = "auto", **options: Any) -> CosyVoice3Backend:
    return CosyVoice3Backend(model_dir, device=device, dtype=dtype, **options)


def verify(model_dir: Path) -> list[str]:
    """Check the official layout file by file, then load every stage on the CPU. Raises ModelFileError."""
    return verify_layout(Path(model_dir), REQUIRED_FILES, CosyVoice3Backend, "speech_tokenizer_v3.onnx")


def make_tiny(out_dir: Path, size: str = "tiny") -> None:
    _make_tiny(out_dir, size=size)
