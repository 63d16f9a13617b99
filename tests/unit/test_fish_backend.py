"""Fish backend behaviour on the random-weight model from `make_tiny` (the `tiny_fish_dir` fixture)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import regex
import torch

from cosyapp.backends.fish import backend as fish
from cosyapp.backends.fish.codec import load_codec
from cosyapp.backends.fish.config import CodecConfig, DualARConfig, tiny_codec_config
from cosyapp.backends.fish.tokenizer import FISH_PRETOKENIZE_PATTERN, FishTokenizer
from cosyapp.engine.types import Cancelled, InputError, Mode, ModelFileError, SynthesisRequest


@pytest.fixture(scope="module")
def backend(tiny_fish_dir):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return fish.load(tiny_fish_dir, device="cpu", dtype="float32")


def test_make_tiny_writes_the_release_layout(tiny_fish_dir):
    assert sorted(p.name for p in tiny_fish_dir.iterdir()) == sorted(fish.MODEL_FILES)
    lines = fish.verify(tiny_fish_dir)
    assert any(line.startswith("model.pth: all") for line in lines)
    assert any(line.startswith("codec.pth: all keys match") for line in lines)
    codec_state = torch.load(tiny_fish_dir / "codec.pth", weights_only=True)
    assert any(k.endswith(".parametrizations.weight.original0") for k in codec_state)
    assert any(k.endswith(".weight_g") for k in codec_state)
    assert CodecConfig.from_state_dict(codec_state) == tiny_codec_config()


def test_info(backend, tiny_fish_dir):
    info = backend.info()
    assert info.sample_rate == 44100
    assert info.model_type == "OpenAudio-S1-mini"
    assert info.model_dir == str(tiny_fish_dir)
    assert set(info.modes) == {"zero_shot", "cross_lingual"}


def test_streaming_equals_one_shot_decode(backend):
    """The incremental decode of frames as they arrive matches upstream's one decode at the end."""
    def request(stream: bool) -> SynthesisRequest:
        return SynthesisRequest(text="Hello world.", voice=backend.no_reference_voice(), seed=7, stream=stream,
                                fixed_length=45)

    streamed = list(backend.synthesize(request(True)))
    (whole,) = list(backend.synthesize(request(False)))
    assert len(streamed) > 2
    assert whole.shape == (45 * 2048,)  # fixed_length frames, none dropped
    np.testing.assert_allclose(np.concatenate(streamed), whole, rtol=0, atol=1e-4)


def test_seed_reproducible_and_drop_last(backend):
    def frames(seed: int) -> torch.Tensor:
        request = SynthesisRequest(text="Seeds.", voice=backend.no_reference_voice(), seed=seed,
                                   options={"max_new_tokens": 6})
        return torch.cat(list(backend.generate_frames(request)), dim=1)

    a, b = frames(3), frames(3)
    assert torch.equal(a, b)
    assert a.shape[1] <= 6
    request = SynthesisRequest(text="Seeds.", voice=backend.no_reference_voice(), seed=3, stream=False,
                               options={"max_new_tokens": 6})
    (audio,) = list(backend.synthesize(request))
    assert audio.shape == ((a.shape[1] - 1) * 2048,)


def test_voice_from_recording_and_state_round_trip(backend):
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(16000)).astype(np.float32)  # 1 s at 16 kHz: resampled to 44.1 kHz
    voice = backend.prepare_voice(audio, 16000, "a transcript")
    (reference,) = voice.features
    assert reference.codes.shape == (10, -(-44100 // 2048))
    assert reference.codes.dtype == torch.long and reference.text == "a transcript"
    state = backend.voice_state(voice)
    torch.save(state, "/dev/null")  # plain tensors and strings
    again = backend.voice_from_state(state, "another transcript")
    assert torch.equal(again.features[0].codes, reference.codes)
    assert again.features[0].text == "another transcript"


def test_modes_choose_the_transcript(backend):
    voice = backend.voice_from_state({"codes": [torch.zeros(10, 3, dtype=torch.long)], "texts": ["stored"]}, None)
    tok = backend.tokenizer

    def prompt_text(mode: Mode, prompt_text: str | None) -> str:
        request = SynthesisRequest(text="Go.", voice=voice, mode=mode, prompt_text=prompt_text)
        ids = backend.prompt_for(request)[0]
        return tok.decode([i for i in ids.tolist() if not tok.semantic_begin_id <= i <= tok.semantic_end_id])

    assert prompt_text(Mode.ZERO_SHOT, None) == "<|interleave|><|speaker:0|>stored<|im_end|><|speaker:0|>Go."
    assert prompt_text(Mode.ZERO_SHOT, "given") == "<|interleave|><|speaker:0|>given<|im_end|><|speaker:0|>Go."
    assert prompt_text(Mode.CROSS_LINGUAL, "given") == "<|interleave|><|speaker:0|><|im_end|><|speaker:0|>Go."


@pytest.mark.parametrize("options,message", [
    ({"temperature": 0}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"repetition_penalty": 2.01}, "repetition"),
    ({"max_new_tokens": 1}, "max_new_tokens"), ({"max_new_tokens": "many"}, "max_new_tokens"),
    ({"chunk_length": -1}, "chunk_length"), ({"top_k": 30}, "unknown"),
])
def test_bad_options_are_input_errors(backend, options, message):
    request = SynthesisRequest(text="Hi.", voice=backend.no_reference_voice(), options=options)
    with pytest.raises(InputError, match=message):
        next(backend.synthesize(request))


def test_unsupported_requests(backend):
    voice = backend.no_reference_voice()
    with pytest.raises(InputError, match="instruction"):
        next(backend.synthesize(SynthesisRequest(text="Hi.", voice=voice, instruction="whisper")))
    with pytest.raises(InputError, match="modes"):
        next(backend.synthesize(SynthesisRequest(text="Hi.", voice=voice, mode=Mode.INSTRUCT2)))
    with pytest.raises(InputError, match="empty"):
        next(backend.synthesize(SynthesisRequest(text="  ", voice=voice)))
    with pytest.raises(InputError, match="prompt"):
        next(backend.synthesize(SynthesisRequest(text="x" * 3000, voice=voice)))
    with pytest.raises(InputError):
        backend.prepare_voice(np.zeros((2, 100), np.float32), 16000, None)


def test_cancel_stops_the_stream_and_the_next_request_is_served(backend):
    request = SynthesisRequest(text="Hello.", voice=backend.no_reference_voice(), seed=1, stream=True,
                               fixed_length=30)
    stream = backend.synthesize(request)
    next(stream)
    request.cancel.set()
    with pytest.raises(Cancelled):
        next(stream)
    again = SynthesisRequest(text="Hello.", voice=backend.no_reference_voice(), seed=1, stream=False, fixed_length=8)
    (audio,) = list(backend.synthesize(again))
    assert audio.size > 0


def test_missing_and_corrupt_files_are_named(tiny_fish_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_fish_dir, broken)
    (broken / "codec.pth").unlink()
    with pytest.raises(ModelFileError, match="codec.pth"):
        fish.verify(broken)
    (broken / "codec.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="codec.pth"):
        fish.verify(broken)
    with pytest.raises(ModelFileError, match="codec.pth"):
        load_codec(broken / "codec.pth")
    shutil.copy(tiny_fish_dir / "codec.pth", broken / "codec.pth")
    state = torch.load(broken / "model.pth", weights_only=True)
    state.pop("norm.weight")
    torch.save(state, broken / "model.pth")
    with pytest.raises(ModelFileError, match="model.pth.*norm.weight"):
        fish.verify(broken)


def test_config_rejects_unknown_keys_and_fills_fast_defaults(tiny_fish_dir):
    raw = json.loads((tiny_fish_dir / "config.json").read_text())
    with pytest.raises(ModelFileError, match="norm_fastlayer_input"):
        DualARConfig.from_dict({**raw, "norm_fastlayer_input": True})
    with pytest.raises(ModelFileError, match="model_type"):
        DualARConfig.from_dict({**raw, "model_type": "naive"})
    minimal = {k: v for k, v in raw.items() if not k.startswith("fast_")}
    cfg = DualARConfig.from_dict(minimal)
    assert (cfg.fast_dim, cfg.fast_n_head, cfg.fast_head_dim) == (cfg.dim, cfg.n_head, cfg.head_dim)


def test_tokenizer_numbers_specials_sequentially(tiny_fish_dir, tmp_path):
    """S1 ignores the ids stored in special_tokens.json and skips `=` rank lines."""
    shutil.copy(tiny_fish_dir / "tokenizer.tiktoken", tmp_path / "tokenizer.tiktoken")
    with open(tmp_path / "tokenizer.tiktoken", "a", encoding="ascii") as f:
        f.write("= 256\n")
    specials = json.loads((tiny_fish_dir / "special_tokens.json").read_text())
    (tmp_path / "special_tokens.json").write_text(json.dumps({k: 7 for k in specials}))
    tok = FishTokenizer.from_model_dir(tmp_path)
    assert tok.n_ranks == 256
    assert tok.special_ids["<|begin_of_text|>"] == 256 and tok.semantic_begin_id == 271
    assert tok.encode("<|im_end|><|speaker:0|>") == [tok.im_end_id] + list(b"<|speaker:0|>")


def test_pretokenizer_pattern_quirks():
    pattern = regex.compile(FISH_PRETOKENIZE_PATTERN)

    def split(text: str) -> list[str]:
        return [m.group(0) for m in pattern.finditer(text)]

    assert split("2024") == ["2", "0", "2", "4"]  # single digits
    assert split("a   b") == ["a", "   ", "b"]  # whitespace runs kept whole
    assert split("，世界") == ["，", "世界"]  # lone punctuation
    assert split("Wait  ?!what") == ["Wait", "  ?!w", "hat"]  # `(\?!\S)` is a literal "?!", not a look-ahead
