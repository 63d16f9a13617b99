"""A local stand-in for the Hugging Face Hub HTTP API, enough for `huggingface_hub.snapshot_download`.

`cosyapp models pull` runs with HF_ENDPOINT pointing here, so the code path is the real library call; only
the server is local. It serves one repo from a folder and records every request it answered."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo_id: str, folder: Path) -> None:
        self.repo_id = repo_id
        self.files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        self.requests: list[tuple[str, str]] = []
        # Files whose next download breaks off halfway, and the (file, offset) of each resumed download.
        self.interrupt: set[str] = set()
        self.resumed: list[tuple[str, int]] = []
        self.app = Starlette(routes=[
            Route("/api/models/{repo:path}/revision/{revision}", self.repo_info),
            Route("/api/models/{repo:path}/tree/{revision}", self.tree),
            Route("/{repo:path}/resolve/{revision}/{filename:path}", self.resolve, methods=["GET", "HEAD"]),
        ])
        self._server: uvicorn.Server | None = None

    def _sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name].read_bytes()).hexdigest()

    def _blob_id(self, name: str) -> str:
        data = self.files[name].read_bytes()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    async def repo_info(self, request: Request) -> Response:
        self.requests.append((request.method, request.url.path))
        if request.path_params["repo"] != self.repo_id:
            return JSONResponse({"error": "Repository not found"}, status_code=404,
                                headers={"X-Error-Code": "RepoNotFound"})
        return JSONResponse({"id": self.repo_id, "modelId": self.repo_id, "sha": COMMIT, "private": False,
                             "siblings": [{"rfilename": name} for name in self.files]})

    async def tree(self, request: Request) -> Response:
        self.requests.append((request.method, request.url.path))
        entries = []
        for name, path in self.files.items():
            size = path.stat().st_size
            entries.append({"type": "file", "path": name, "size": size, "oid": self._blob_id(name),
                            "lfs": {"oid": self._sha256(name), "size": size, "pointerSize": 134}})
        return JSONResponse(entries)

    async def resolve(self, request: Request) -> Response:
        self.requests.append((request.method, request.url.path))
        name = request.path_params["filename"]
        if request.path_params["repo"] != self.repo_id or name not in self.files:
            return JSONResponse({"error": "Entry not found"}, status_code=404,
                                headers={"X-Error-Code": "EntryNotFound"})
        data = self.files[name].read_bytes()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{self._sha256(name)}"', "Accept-Ranges": "bytes",
                   "Content-Length": str(len(data))}
        if request.method == "HEAD":
            return Response(b"", headers=headers)
        if name in self.interrupt:
            self.interrupt.discard(name)
            return StreamingResponse(self._broken(data[: len(data) // 2]), headers=headers)
        if request.headers.get("range", "").startswith("bytes="):
            start = int(request.headers["range"][6:].split("-")[0])
            self.resumed.append((name, start))
            headers.update({"Content-Length": str(len(data) - start),
                            "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
            return Response(data[start:], status_code=206, headers=headers)
        return Response(data, headers=headers)

    @staticmethod
    async def _broken(first_half: bytes):
        yield first_half
        raise ConnectionAbortedError("fake hub: connection dropped mid-file")

    def downloads(self) -> list[str]:
        """Files whose content was sent (GET on resolve)."""
        return [path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in self.requests
                if method == "GET" and "/resolve/" in path]

    def start(self, port: int) -> str:
        # log_level critical: the deliberately broken downloads would print tracebacks otherwise.
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="critical"))
        thread = threading.Thread(target=self._server.run, daemon=True)
        thread.start()
        while not self._server.started:
            thread.join(0.05)
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
