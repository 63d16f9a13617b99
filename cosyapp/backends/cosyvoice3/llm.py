"""The CosyVoice3 LM (upstream `CosyVoice3LM`): CosyVoice2's Qwen2 body with the CosyVoice3
embedding layout and head (golden README 5.2, quirks 4-7).

- No `llm_embedding` table: sos and task_id are rows speech_token_size and speech_token_size + 2 of
  `speech_embedding`, which (like the bias-free `llm_decoder`) has speech_token_size + 200 rows.
- Decoding stops on any id >= speech_token_size. Before min_len upstream bans only id speech_token_size (its
  *sos*; eos is +1), so the other stop ids can end a sentence early; CosyVoice2's `StopRule` bans exactly that
  id, so it is reused as is.
Decoding is CosyVoice2's (cosyvoice2/decoding.py); the silence cap on its tokens is in decoding.py here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM, Qwen2, _Nest
from cosyapp.backends.cosyvoice3.config import CosyVoice3Config, LMConfig
from cosyapp.backends.weights import load_state_dict


class CosyVoice3LM(CosyVoice2LM):
    """Upstream `CosyVoice3LM` for inference. The speaker embedding is not an input (upstream ignores it)."""

    def __init__(self, config: LMConfig) -> None:
        nn.Module.__init__(self)  # not CosyVoice2LM.__init__: its tables have other shapes
        self.config = config
        self.llm = _Nest(_Nest(Qwen2(config.qwen)))
        self.llm_decoder = nn.Linear(config.llm_output_size, config.num_speech_ids, bias=False)
        self.speech_embedding = nn.Embedding(config.num_speech_ids, config.llm_input_size)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: CosyVoice3Config | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "CosyVoice3LM":
        """Load `<model_dir>/llm.pt` (the official CosyVoice3LM state dict) strictly."""
        model_dir = Path(model_dir)
        config = config or CosyVoice3Config.from_model_dir(model_dir)
        path = model_dir / "llm.pt"
        # embed_tokens may be a strided view into a shared pool: give every tensor its own memory.
        state = {key: value.contiguous() for key, value in load_state_dict(path).items()}
        return cls.from_state(config.llm, state, str(path), device, dtype)

    def build_lm_input(self, text_ids: torch.Tensor, prompt_text_ids: torch.Tensor,
                       prompt_speech_tokens: torch.Tensor) -> torch.Tensor:
        """speech_embedding[sos] ++ embed_tokens(prompt_text ++ text) ++ speech_embedding[task_id] ++
        speech_embedding(prompt speech tokens) -> [1, L, hidden]. Ids may be 1-D or [1, N]."""
        device = self.device
        text = torch.cat([prompt_text_ids.reshape(-1), text_ids.reshape(-1)]).long().to(device)
        speech = prompt_speech_tokens.reshape(-1).long().to(device)
        table = self.speech_embedding.weight
        sos, task = table[self.config.sos:self.config.sos + 1], table[self.config.task_id:self.config.task_id + 1]
        parts = [sos, self.qwen.embed_tokens(text), task, self.speech_embedding(speech)]
        return torch.cat(parts, dim=0).unsqueeze(0)
