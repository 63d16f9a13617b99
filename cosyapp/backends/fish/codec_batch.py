"""Incremental codec decoding of several utterances in one call: their streaming states (see `codec`) merged
into the state of one batch, decoded, and split back.

Every utterance in a batch must have decoded at least one chunk before (the conv contexts then have their
fixed sizes), and all decode the same number of frames; their positions and attention windows may differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cosyapp.backends.fish.codec import CodecTransformer, DecodeStream, FishCodec, StreamState, WindowAttention


def decode_batch(codec: FishCodec, codes: Tensor, states: list[StreamState]) -> tuple[Tensor, list[StreamState]]:
    """The next chunk of each utterance: `codes [B, 10, n]`, `states[b]` utterance b's streaming state (all
    empty for first chunks) -> audio `[B, 1, n * 2048]` and the utterances' new states."""
    stream = DecodeStream(codec)
    stream.state = merge_stream_states(states)
    audio = stream.push(codes)
    return audio, split_stream_state(stream.state, len(states))


def merge_stream_states(states: list[StreamState]) -> StreamState:
    """The streaming states of several utterances as one state of their batch (row i = utterance i). Every
    utterance must have decoded at least one chunk (conv contexts then have their fixed sizes); positions and
    attention windows may differ: shorter windows are padded on the left, which the attention masks out."""
    if len(states) == 1:
        return states[0]
    merged: StreamState = {}
    for module, first in states[0].items():
        values = [state[module] for state in states]
        if isinstance(module, CodecTransformer):
            merged[module] = [start for starts in values for start in starts]
        elif isinstance(module, WindowAttention):
            held = max(k.shape[2] for k, _, _ in values)
            pad = [(0, 0, held - k.shape[2], 0) for k, _, _ in values]
            merged[module] = (torch.cat([F.pad(k, p) for (k, _, _), p in zip(values, pad)]),
                              torch.cat([F.pad(v, p) for (_, v, _), p in zip(values, pad)]),
                              [length for _, _, lengths in values for length in lengths])
        else:
            merged[module] = torch.cat(values)
    return merged


def split_stream_state(state: StreamState, n: int) -> list[StreamState]:
    """The inverse of `merge_stream_states`: one state per batch row (views of the batch's tensors, each
    window cut to the row's own keys)."""
    if n == 1:
        return [state]
    parts: list[StreamState] = [{} for _ in range(n)]
    for module, value in state.items():
        if isinstance(module, CodecTransformer):
            rows = [[start] for start in value]
        elif isinstance(module, WindowAttention):
            k, v, lengths = value
            held = k.shape[2]
            rows = [(k[i:i + 1, :, held - length:], v[i:i + 1, :, held - length:], [length])
                    for i, length in enumerate(lengths)]
        else:
            rows = value.split(1)
        for part, row in zip(parts, rows, strict=True):
            part[module] = row
    return parts
