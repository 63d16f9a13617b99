"""A scripted OpenAI-compatible chat endpoint: it streams a fixed answer word by word at a steady rate, like a
real chat model would, and keeps the requests it got. The agent benchmark uses it as a chat model whose pace is
known, and the tests use it to see what the agent sends (real HTTP, real streaming).

    with ScriptedChat(answer, words_per_s=20) as chat:   # chat.url: set [agent] chat_url to it
        ...
        chat.requests  # the JSON bodies received"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cosyapp.service_process import free_port

HOST = "127.0.0.1"


class ScriptedChat:
    def __init__(self, answer: str, words_per_s: float = 20.0, delay_s: float = 0.0) -> None:
        """`answer`: what every request gets; `delay_s`: silence before the first word (a slow model)."""
        self.answer = answer
        self.words_per_s = words_per_s
        self.delay_s = delay_s
        self.requests: list[dict[str, Any]] = []
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}/v1"
        app = Starlette(routes=[Route("/v1/chat/completions", self._complete, methods=["POST"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> ScriptedChat:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the scripted chat endpoint did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def pieces(self) -> list[str]:
        """The answer in the pieces it is streamed in: one word each, with the space before it."""
        words = self.answer.split(" ")
        return [words[0], *(f" {word}" for word in words[1:])]

    async def _complete(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        if not body.get("stream"):
            return JSONResponse({"error": "this endpoint only streams"}, status_code=400)
        return StreamingResponse(self._events(body.get("model", "")), media_type="text/event-stream")

    async def _events(self, model: str) -> AsyncIterator[bytes]:
        await asyncio.sleep(self.delay_s)
        for piece in self.pieces():
            chunk = {"id": "scripted", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            await asyncio.sleep(1 / self.words_per_s)
        done = {"id": "scripted", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode()
