"""The Fish model runner against the golden set: a stream decoded by the runner (alone, and beside another
stream in the same batched forwards) reproduces upstream's frames exactly and its audio within the end-to-end
tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from cosyapp.backends.fish.generate import SamplingParams, frame_budget, request_generator
from cosyapp.backends.fish.runner import FishStreamState
from cosyapp.backends.fish.serving import STREAM_FIRST_FRAMES, STREAM_FRAMES
from cosyapp.engine.types import Mode, SynthesisRequest

AUDIO_ATOL = 2e-4  # as test_fish_end_to_end


@pytest.fixture(scope="module")
def reference_voice(fish_backend, fish_golden, fish_goldens_json):
    audio, rate = sf.read(fish_golden / "reference.wav", dtype="float32")
    return fish_backend.prepare_voice(audio, rate, fish_goldens_json["reference_text"])


def run(runner, states: list[FishStreamState]) -> list[np.ndarray]:
    """Prefill the states together, decode them together, audio on the streaming schedule; their audio."""
    chunks: list[list[np.ndarray]] = [[] for _ in states]
    runner.prefill(states)
    while True:
        live = [state for state in states if not state.finished]
        if live:
            runner.decode_step(live)
        work = [(i, state.decodable) for i, state in enumerate(states)
                if state.decodable >= (STREAM_FIRST_FRAMES if state.decoded == 0 else STREAM_FRAMES)
                or (state.finished and state.decodable)]
        if work:
            for (i, _), audio in zip(work, runner.codec_decode([(states[i], n) for i, n in work])):
                chunks[i].append(audio)
        if not live and not work:
            break
    for state in states:
        runner.release(state)
    return [np.concatenate(parts) for parts in chunks]


def test_runner_reproduces_upstream_frames(fish_backend, fish_npz, fish_goldens_json):
    g, p = fish_goldens_json, fish_goldens_json["gen_params"]
    params = SamplingParams(temperature=p["temperature"], top_p=p["top_p"], repetition_penalty=p["repetition_penalty"],
                            max_new_tokens=p["max_new_tokens"])
    prompt = torch.from_numpy(fish_npz("tokenizer")["prompt_ref"])
    runner = fish_backend.runner
    budget = frame_budget(prompt.shape[-1], params.max_new_tokens, fish_backend.model.config.max_seq_len)
    state = runner.start(0, prompt, params, request_generator(g["gen_seed"], "cpu"), budget, g["im_end_id"])
    run(runner, [state])
    np.testing.assert_array_equal(state.frames_so_far().numpy(), fish_npz("llama")["gen_frames"])


@pytest.mark.parametrize("together", [False, True])
def test_runner_streams_reproduce_upstream_codes_and_audio(fish_backend, reference_voice, fish_npz,
                                                           fish_goldens_json, together):
    """e1 (no reference) and e2 (reference voice): alone, or both in the same batched calls."""
    golden = fish_npz("end_to_end")
    names = {"e1": ("e1_final_audio", None), "e2": ("e2_segment0", reference_voice)}
    requests = {}
    for name, (_, voice) in names.items():
        fields = fish_goldens_json[name]["request"]
        requests[name] = SynthesisRequest(
            text=fields["text"], voice=voice if voice is not None else fish_backend.no_reference_voice(),
            mode=Mode.ZERO_SHOT, seed=fields["seed"], stream=True,
            options={key: fields[key] for key in ("max_new_tokens", "top_p", "repetition_penalty", "temperature",
                                                  "chunk_length")})
    rows = {"e1": 0, "e2": fish_backend.runner.rows - 1 if together else 0}  # the backend loads two rows
    states = {name: fish_backend.start_stream(request, rows[name]) for name, request in requests.items()}
    if together:
        audio = dict(zip(states, run(fish_backend.runner, list(states.values()))))
    else:
        audio = {name: run(fish_backend.runner, [state])[0] for name, state in states.items()}
    for name, (audio_key, _) in names.items():
        frames = states[name].frames_so_far()
        np.testing.assert_array_equal(frames[1:, :-1].numpy(), golden[f"{name}_codes"])
        np.testing.assert_array_equal(frames[:, -1].numpy(), golden[f"{name}_last_frame"])
        np.testing.assert_allclose(audio[name], golden[audio_key], rtol=0, atol=AUDIO_ATOL)
