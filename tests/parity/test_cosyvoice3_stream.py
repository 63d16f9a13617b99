"""Parity of CosyVoice3's streaming token2wav with upstream: golden stream.npz (ladder 6).

Upstream's tts(stream=True) on flow.npz's tokens with the zero_shot prompt: the call schedule (token slices,
offsets, flags), the mel handed to HiFT at every call (all frames so far), the emitted chunks, and the
non-streaming waveform of the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cosyapp.backends.cosyvoice2.token2wav import prompt_token_pad
from cosyapp.backends.cosyvoice3.config import CosyVoice3Config
from cosyapp.backends.cosyvoice3.flow import CosyVoice3Flow
from cosyapp.backends.cosyvoice3.hift import CausalHiFTGenerator
from cosyapp.backends.cosyvoice3.token2wav import ChunkCall, Token2Wav

ATOL = 1e-4  # README: mels and waveforms within ~1e-4 abs


@pytest.fixture(scope="module")
def token2wav(cosyvoice3_golden: Path) -> Token2Wav:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model_dir = cosyvoice3_golden / "tiny"
    config = CosyVoice3Config.from_model_dir(model_dir)
    return Token2Wav(CosyVoice3Flow.from_pretrained(model_dir, config),
                     CausalHiFTGenerator.from_pretrained(model_dir, config), config, exact=True)


@pytest.fixture(scope="module")
def prompt(cv3_npz) -> tuple[torch.Tensor, ...]:
    flow = cv3_npz("flow")
    return (torch.from_numpy(flow["prompt_token"])[None], torch.from_numpy(flow["prompt_feat"])[None],
            torch.from_numpy(flow["embedding"])[None])


def close(ours: torch.Tensor, ref: np.ndarray, name: str) -> None:
    assert tuple(ours.shape) == ref.shape, f"{name}: shape {tuple(ours.shape)} != {ref.shape}"
    err = float((ours.double() - torch.from_numpy(ref).double()).abs().max())
    assert err <= ATOL, f"{name}: max abs diff {err:.3g} > {ATOL:g}"


def test_streaming_schedule_and_chunks(token2wav, prompt, cv3_npz, cv3_settings):
    golden, tokens = cv3_npz("stream"), cv3_npz("flow")["tokens"].tolist()
    schedule = cv3_settings["stream"]
    assert prompt_token_pad(prompt[0].shape[1], token2wav.chunk_size) == int(golden["prompt_token_pad"])
    assert token2wav.chunk_size == schedule["token_hop_len_initial"]
    assert token2wav.max_hop == schedule["token_max_hop_len"]
    session = token2wav.new_stream(*prompt, stream=True)
    chunks, mels = [], []
    vocode = session.vocode

    def recording_vocode(call: ChunkCall) -> torch.Tensor:
        chunk = vocode(call)
        mels.append(session.mel[0].clone())
        return chunk

    session.vocode = recording_vocode
    for token in tokens:  # one at a time, like the LM hands them over
        chunks += session.push([token])
    chunks.append(session.finish())

    assert [c["token_len"] for c in session.calls] == [c["token_len"] for c in schedule["calls"]]
    assert [c["token_offset"] for c in session.calls] == [c["token_offset"] for c in schedule["calls"]]
    assert [c["finalize"] for c in session.calls] == [c["finalize"] for c in schedule["calls"]]
    assert [c["speech_offset_before"] for c in session.calls] == golden["call_speech_offset"].tolist()
    assert [c.numel() for c in chunks] == golden["chunk_lengths"].tolist() == schedule["chunk_lengths"]
    for i, (mel, chunk) in enumerate(zip(mels, chunks)):
        close(mel, golden[f"call{i}_hift_in_mel"], f"call{i}_hift_in_mel")
        close(chunk, golden[f"chunk{i}"], f"chunk{i}")


def test_non_streaming(token2wav, prompt, cv3_npz):
    golden, tokens = cv3_npz("stream"), cv3_npz("flow")["tokens"].tolist()
    close(token2wav.full(tokens, *prompt), golden["nonstream_wav"], "nonstream_wav")


def test_bounded_streaming(token2wav, prompt, cv3_npz):
    """`exact=False`: only the new frames go through flow and the last ones through HiFT. The non-final chunks
    are upstream's; the final call's mel is the chunk-masked one (flow.npz), and every sample is HiFT's on the
    whole mel."""
    golden, flow_golden = cv3_npz("stream"), cv3_npz("flow")
    bounded = Token2Wav(token2wav.flow, token2wav.hift, token2wav.config, exact=False)
    session = bounded.new_stream(*prompt, stream=True)
    chunks = []
    for token in flow_golden["tokens"].tolist():
        chunks += session.push([token])
    chunks.append(session.finish())
    assert [c.numel() for c in chunks] == golden["chunk_lengths"].tolist()
    for i, chunk in enumerate(chunks[:-1]):
        close(chunk, golden[f"chunk{i}"], f"bounded chunk{i}")
    close(session.mel[0], flow_golden["fullseq_streamingmask_finalize_mel"], "bounded mel")
    whole, _ = token2wav.hift.inference(session.mel, finalize=True)
    close(torch.cat(chunks), whole[0].numpy(), "bounded audio vs HiFT on the whole mel")
