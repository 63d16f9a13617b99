"""CosyVoice3 frontend: CosyVoice2's (prompt analysis, text normalisation, model-input assembly) with the
CosyVoice3 tokenizer, speech tokenizer v3, the yaml's 12 kHz prompt mel, and the mandatory prompt prefix.

The CosyVoice3 LM only works when `<|endofprompt|>` is in its text (upstream asserts it and the worker
dies). Upstream leaves that to the caller (its examples prefix a system prompt by hand); here each mode gets
it added when the caller did not: zero_shot prefixes the prompt transcript, instruct2 wraps the instruction
(also one in CosyVoice2's form, which ends with the marker but lacks the system prompt),
cross_lingual prefixes the sentence itself (it has no prompt text), exactly as upstream's examples spell it.
"""

from __future__ import annotations


from cosyapp.backends.cosyvoice2.frontend import CosyVoice2Frontend, ModelInput, VoiceFeatures
from cosyapp.backends.cosyvoice3.tokenizer import CosyVoice3Tokenizer
from cosyapp.engine.types import Mode

SYSTEM_PROMPT = "You are a helpful assistant."
END_OF_PROMPT = "<|endofprompt|>"


class CosyVoice3Frontend(CosyVoice2Frontend):
    """Tokenizer + speech tokenizer v3 + speaker model of a CosyVoice3 model directory (see CosyVoice2Frontend)."""

    tokenizer_class = CosyVoice3Tokenizer
    speech_tokenizer_file = "speech_tokenizer_v3.onnx"

    def prompt_text_ids(self, text: str) -> list[int]:
        """The zero-shot prompt transcript: used raw when it holds `<|endofprompt|>` (upstream leaves texts with
        tags alone), else normalised and put after the system prompt."""
        if END_OF_PROMPT in text:
            return self.tokenizer.encode(text)
        return self.tokenizer.encode(SYSTEM_PROMPT + END_OF_PROMPT) + super().prompt_text_ids(text)

    def instruction_ids(self, text: str) -> list[int]:
        """The instruct2 instruction in upstream's example form `You are a helpful assistant. <text><|endofprompt|>`.
        The service's (CosyVoice2's) form `<text><|endofprompt|>` and a bare `<text>` are wrapped into it; a text
        that already starts with the system prompt, or holds the marker elsewhere, is used raw."""
        body = text.removesuffix(END_OF_PROMPT)
        if END_OF_PROMPT not in body and not body.startswith(SYSTEM_PROMPT):
            text = f"{SYSTEM_PROMPT} {body}{END_OF_PROMPT}"
        return self.tokenizer.encode(text)

    def build_model_input(self, mode: Mode, text_ids: list[int], voice: VoiceFeatures,
                          prompt_text_ids: list[int] | None = None) -> ModelInput:
        """As CosyVoice2's; cross_lingual sentences without `<|endofprompt|>` get the system prompt prepended
        (it then counts towards the sentence's length limits, as upstream's prefixed text does)."""
        if Mode(mode) is Mode.CROSS_LINGUAL and self.tokenizer.token_id(END_OF_PROMPT) not in text_ids:
            text_ids = self.tokenizer.encode(SYSTEM_PROMPT + END_OF_PROMPT) + list(text_ids)
        return super().build_model_input(mode, text_ids, voice, prompt_text_ids)


