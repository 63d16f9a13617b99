"""The CosyVoice2 LM: a Qwen2 transformer over text + speech-token embeddings and a speech-token head (dossier
section 4, golden README 5.2 and quirks 1-4). Decoding (stop rules, sampling, the loop) is in decoding.py.

The transformer runs on embeddings (never on Qwen text ids directly) with a preallocated KV cache:
`max_batch` rows x `max_seq_len` positions. Every call passes explicit per-row positions and the first
cache row of its batch, so one stream can be prefilled into its own row and later several rows can be
decoded together in one forward, each at its own position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cosyapp.backends.cosyvoice2.config import CosyVoice2Config, LLMConfig, Qwen2Config
from cosyapp.backends.weights import check_keys, load_state_dict

CACHE_LEN_MULTIPLE = 256  # grow the KV cache in steps, not once per request length


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the model dtype, like Qwen2 does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, theta: float, max_seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_seq_len, head_dim] for the half-split ("rotate_half") rotary layout Qwen2 uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [B, 1, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Keys/values [max_batch, kv_heads, max_seq_len, head_dim]; non-persistent (not in the state dict)."""

    def __init__(self, max_batch: int, max_seq_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (max_batch, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, first_row: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, kv_heads, T, D] at per-row positions input_pos [B, T] of rows first_row..+B, and
        return the first kv_len positions of those rows (views)."""
        batch = k.shape[0]
        k_rows, v_rows = self.k[first_row:first_row + batch], self.v[first_row:first_row + batch]
        row = torch.arange(batch, device=k.device)[:, None]
        k_rows[row, :, input_pos] = k.transpose(1, 2)
        v_rows[row, :, input_pos] = v.transpose(1, 2)
        return k_rows[:, :, :kv_len], v_rows[:, :, :kv_len]


class Attention(nn.Module):
    """Grouped-query attention with q/k/v biases and no output bias."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=True)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                input_pos: torch.Tensor, first_row: int, kv_len: int) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = self.kv_cache.update(first_row, input_pos, k, v, kv_len)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                input_pos: torch.Tensor, first_row: int, kv_len: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, first_row, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2(nn.Module):
    """The Qwen2 decoder stack (`Qwen2Model`): text embedding table, layers, final RMSNorm."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.max_batch = 0
        self.max_seq_len = 0
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    def setup_cache(self, max_batch: int, max_seq_len: int) -> None:
        """(Re)allocate the KV cache and RoPE tables on the parameters' device and dtype."""
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        weight = self.norm.weight
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, max_seq_len, self.config.num_kv_heads,
                                               self.config.head_dim, weight.dtype, weight.device)
        cos, sin = rope_tables(self.config.head_dim, self.config.rope_theta, max_seq_len, weight.device)
        self.rope_cos, self.rope_sin = cos.to(weight.dtype), sin.to(weight.dtype)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, first_row: int = 0,
                kv_len: int | None = None) -> torch.Tensor:
        """x [B, T, hidden] embeddings at positions input_pos [B, T] -> final-norm hidden states [B, T, hidden].

        Rows first_row..first_row+B of the cache are used. Each query sees the cached positions <= its
        own; kv_len (a host int >= every position + 1, default max_seq_len) bounds how much of the
        cache is read.
        """
        if self.rope_cos is None:
            raise RuntimeError("call setup_cache() before running the transformer")
        if first_row + x.shape[0] > self.max_batch:
            raise ValueError(f"rows {first_row}..{first_row + x.shape[0] - 1} exceed the cache's {self.max_batch}")
        kv_len = self.max_seq_len if kv_len is None else kv_len
        cos = self.rope_cos[input_pos].unsqueeze(1)
        sin = self.rope_sin[input_pos].unsqueeze(1)
        mask = (torch.arange(kv_len, device=x.device) <= input_pos[..., None]).unsqueeze(1)  # [B, 1, T, kv_len]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, first_row, kv_len)
        return self.norm(x)


class _Nest(nn.Module):
    """One `.model` level of upstream's nesting (Qwen2Encoder.model = Qwen2ForCausalLM, whose .model is
    the Qwen2Model), kept so our state-dict keys are exactly llm.pt's (`llm.model.model.layers.0...`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def length_limits(num_text_tokens: int) -> tuple[int, int]:
    """(min_len, max_len) of generated speech tokens: 2x / 20x the text tokens (prompt text excluded)."""
    return 2 * num_text_tokens, 20 * num_text_tokens


class CosyVoice2LM(nn.Module):
    """Upstream `Qwen2LM` for inference. The speaker embedding is not an input (upstream ignores it)."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = config
        num_speech_ids = config.speech_token_size + 3  # + EOS 6561, 6562 (unused), fill 6563
        self.llm_embedding = nn.Embedding(2, config.llm_input_size)  # row 0 = SOS, row 1 = TASK_ID
        self.llm = _Nest(_Nest(Qwen2(config.qwen)))
        self.llm_decoder = nn.Linear(config.llm_output_size, num_speech_ids)
        self.speech_embedding = nn.Embedding(num_speech_ids, config.llm_input_size)

    @property
    def qwen(self) -> Qwen2:
        return self.llm.model.model

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: CosyVoice2Config | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "CosyVoice2LM":
        """Load `<model_dir>/llm.pt` (the official Qwen2LM state dict) strictly."""
        model_dir = Path(model_dir)
        config = config or CosyVoice2Config.from_model_dir(model_dir)
        path = model_dir / "llm.pt"
        return cls.from_state(config.llm, load_state_dict(path), str(path), device, dtype)

    @classmethod
    def from_state(cls, llm_config: Any, state: dict[str, torch.Tensor], source: str,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Self:
        """Build the model for `llm_config` (the LM config type of `cls`) from a release state dict, strictly."""
        # The Qwen text head is tied to embed_tokens and never used for speech: accept it, drop it.
        state.pop("llm.model.lm_head.weight", None)
        with torch.device("meta"):  # skip the random init of weights we are about to overwrite
            model = cls(llm_config)
        model = model.to_empty(device="cpu")
        check_keys(model, state, source=source)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def setup_cache(self, max_batch: int, max_seq_len: int) -> None:
        self.qwen.setup_cache(max_batch, max_seq_len)

    def ensure_cache(self, seq_len: int) -> None:
        """Reallocate the KV cache (every row) to hold `seq_len` positions, rounded up, if it holds fewer."""
        if self.qwen.max_seq_len < seq_len:
            rounded = -(-seq_len // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE
            self.setup_cache(max(self.qwen.max_batch, 1),
                             min(rounded, self.config.qwen.max_position_embeddings))

    @property
    def device(self) -> torch.device:
        return self.llm_decoder.weight.device

    def build_lm_input(self, text_ids: torch.Tensor, prompt_text_ids: torch.Tensor,
                       prompt_speech_tokens: torch.Tensor) -> torch.Tensor:
        """[SOS] ++ embed_tokens(prompt_text ++ text) ++ [TASK] ++ speech_embedding(prompt speech tokens)
        -> [1, L, hidden]. Ids may be 1-D or [1, N]; empty prompts are fine (cross-lingual, instruct2)."""
        device = self.device
        # .long(): upstream passes empty prompts as float zeros(1, 0).
        text = torch.cat([prompt_text_ids.reshape(-1), text_ids.reshape(-1)]).long().to(device)
        speech = prompt_speech_tokens.reshape(-1).long().to(device)
        sos, task = self.llm_embedding.weight[0:1], self.llm_embedding.weight[1:2]
        parts = [sos, self.qwen.embed_tokens(text), task, self.speech_embedding(speech)]
        return torch.cat(parts, dim=0).unsqueeze(0)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, first_row: int = 0,
                kv_len: int | None = None) -> torch.Tensor:
        """Embeddings [B, T, hidden] -> final hidden states [B, T, hidden] (see Qwen2.forward)."""
        return self.qwen(x, input_pos, first_row, kv_len)

    def speech_logp(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., hidden] -> float32 log-probs over the speech ids [..., speech_token_size + 3]."""
        return self.llm_decoder(hidden).float().log_softmax(dim=-1)

    def step_logp(self, x: torch.Tensor, position: int, cache_row: int) -> torch.Tensor:
        """Run embeddings x [1, T, hidden] at positions position.. of one cache row -> log-probs [V] after the
        last of them."""
        length = x.shape[1]
        input_pos = torch.arange(position, position + length, device=x.device)[None]
        hidden = self(x, input_pos, cache_row, position + length)
        return self.speech_logp(hidden[0, -1])

    def prefill_logp(self, inputs: Sequence[torch.Tensor], first_row: int) -> torch.Tensor:
        """Prefill cache rows first_row.. with one prompt each (embeddings [1, L_i, hidden]) in one forward
        -> log-probs [len(inputs), V] after each prompt's last position.

        Shorter prompts are padded at the end to the longest. A query never sees a later position, so the
        padding changes no real position's output; the keys/values it leaves past a prompt's end are
        overwritten by that row's decode steps before any query reaches them.
        """
        lengths = [x.shape[1] for x in inputs]
        longest = max(lengths)
        x = torch.cat([F.pad(x, (0, 0, 0, longest - x.shape[1])) for x in inputs])
        input_pos = torch.arange(longest, device=x.device).expand(len(inputs), longest)
        hidden = self(x, input_pos, first_row, longest)
        last = torch.tensor(lengths, device=x.device) - 1
        return self.speech_logp(hidden[torch.arange(len(inputs), device=x.device), last])
