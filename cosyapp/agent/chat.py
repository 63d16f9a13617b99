"""Chat models the agent can ask for its answer: any OpenAI-compatible `/chat/completions` endpoint, streamed
(`OpenAIChat`), or the embedded SmolLM2 (`embedded.EmbeddedChat`). Both stream the answer as text deltas and
stop when the consumer stops reading (the request is closed / the generation cancelled)."""

from __future__ import annotations

import json
from typing import AsyncIterator, Protocol

import httpx

from cosyapp.config import AgentSettings
from cosyapp.server.errors import ApiError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}


class ChatError(ApiError):
    """The chat model failed (unreachable, too slow, refused the request); the message says which and why."""


class ChatModel(Protocol):
    def stream(self, messages: list[Message], temperature: float, max_new_tokens: int) -> AsyncIterator[str]:
        """The answer to `messages` as text deltas, in order."""
        ...

    async def close(self) -> None: ...


def completions_url(base_url: str) -> str:
    """`base_url` (e.g. http://host:8000/v1) + /chat/completions, unless it already names that path."""
    base = base_url.rstrip("/")
    return base if base.endswith("/chat/completions") else f"{base}/chat/completions"


class OpenAIChat:
    """An OpenAI-compatible chat endpoint read as server-sent events (`stream: true`)."""

    def __init__(self, url: str, model: str, api_key: str = "", timeout_s: float = 30.0) -> None:
        if not url:
            raise ApiError(503, "the agent's chat model is not configured: set [agent] chat_url (chat = \"openai\")")
        self.url = completions_url(url)
        self.model = model
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s))

    async def stream(self, messages: list[Message], temperature: float, max_new_tokens: int) -> AsyncIterator[str]:
        body = {"model": self.model, "messages": messages, "temperature": temperature,
                "max_tokens": max_new_tokens, "stream": True}
        try:
            async with self.client.stream("POST", self.url, json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode("utf-8", "replace")[:300]
                    raise ChatError(502, f"the chat model at {self.url} answered {response.status_code}: {detail}")
                async for line in response.aiter_lines():
                    delta = _delta(line)
                    if delta is None:
                        return
                    if delta:
                        yield delta
        except httpx.TimeoutException:
            raise ChatError(504, f"the chat model at {self.url} sent nothing for {self.timeout_s:g} s "
                                 "([agent] chat_timeout_s)") from None
        except httpx.HTTPError as e:
            raise ChatError(502, f"the chat model at {self.url} cannot be reached: {type(e).__name__}: {e}") from None

    async def close(self) -> None:
        await self.client.aclose()


def _delta(line: str) -> str | None:
    """The text of one event line ("" for lines without text), None at the end of the answer."""
    if not line.startswith("data:"):
        return ""
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return None
    try:
        event = json.loads(data)
        choice = event["choices"][0] if event.get("choices") else {}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ChatError(502, f"the chat model sent an event that is not a chat completion chunk: {data[:200]}") from None
    if "error" in event:
        raise ChatError(502, f"the chat model failed: {str(event['error'])[:300]}")
    content = (choice.get("delta") or {}).get("content")
    if choice.get("finish_reason") and not content:
        return None
    return content or ""


def make_chat(settings: AgentSettings) -> ChatModel:
    """The chat model `[agent] chat` names."""
    if settings.chat == "openai":
        return OpenAIChat(settings.chat_url, settings.chat_model, settings.chat_api_key, settings.chat_timeout_s)
    from cosyapp.agent.embedded import EmbeddedChat  # torch + transformers: only when it is used

    return EmbeddedChat(settings.embedded_device)
