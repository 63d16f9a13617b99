"""The service a robustness campaign runs against: `python -m cosyapp serve` on a loopback port with CosyVoice2 and
Fish loaded side by side (so every route answers), on given model folders or on tiny random ones made for it,
plus what the campaign reads off it: /stats, its resident memory, and a /health prober. Its voice agent talks to a
scripted OpenAI-compatible chat endpoint run beside it, so /run answers in seconds and speaks real sentences.

Each campaign part starts its own service (a clean memory baseline, and the kill -9 rounds kill theirs)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np

from cosyapp.agent.scripted_chat import ScriptedChat
from cosyapp.config import DEFAULT_CONFIG_FILE, PROJECT_ROOT
from cosyapp.engine.registry import make_tiny
from cosyapp.server.memory import RELEASE_INTERVAL_S
from cosyapp.service_process import ServiceProcess, free_port, start_service

# A real recording: voices, references and uploads of the campaign's requests.
PROMPT = (PROJECT_ROOT / "asset" / "zero_shot_prompt.wav").read_bytes()
PROMPT_B64 = base64.b64encode(PROMPT).decode()
# What the agent's chat model answers every turn: two sentences, so a turn speaks twice.
CHAT_ANSWER = "Hello there, this is the campaign's answer. It has a second sentence too."


@dataclass(frozen=True)
class CampaignModels:
    """Model folders of the campaign's service: CosyVoice2 (the main backend) and Fish (the extra one)."""

    cosyvoice2: Path
    fish: Path

    @classmethod
    def tiny(cls, folder: Path) -> CampaignModels:
        """Tiny random models under `folder` (made once: a model whose marker `folder/.<backend>.complete` is there
        is reused; the marker sits beside the model so the model folder keeps the release layout exactly)."""
        models = cls(folder / "cosyvoice2", folder / "fish")
        for backend, path in (("cosyvoice2", models.cosyvoice2), ("fish", models.fish)):
            marker = folder / f".{backend}.complete"
            if not marker.is_file():
                make_tiny(backend, path)
                marker.touch()
        return models


def service_env(models: CampaignModels, data_dir: Path, port: int, **settings: str) -> dict[str, str]:
    """The environment of a campaign service; `settings` are further COSYAPP_* variables (by full name)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("COSYAPP_")}
    return {
        **env,
        "COSYAPP_CONFIG": str(DEFAULT_CONFIG_FILE),
        "COSYAPP_SERVER_HOST": "127.0.0.1",
        "COSYAPP_SERVER_PORT": str(port),
        "COSYAPP_MODEL_BACKEND": "cosyvoice2",
        "COSYAPP_MODEL_MODEL_DIR": str(models.cosyvoice2),
        "COSYAPP_MODEL_EXTRA_BACKEND": "fish",
        "COSYAPP_MODEL_EXTRA_MODEL_DIR": str(models.fish),
        "COSYAPP_MODEL_DEVICE": "cpu",
        "COSYAPP_STORAGE_DATA_DIR": str(data_dir),
        "COSYAPP_ENGINE_MAX_CONCURRENT": "2",
        "COSYAPP_ENGINE_MAX_QUEUE": "8",
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
        **settings,
    }


@contextlib.contextmanager
def campaign_service(models: CampaignModels, workdir: Path, **settings: str) -> Iterator[ServiceProcess]:
    """A running campaign service keeping its data and log under `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with ScriptedChat(CHAT_ANSWER, words_per_s=200) as chat:
        env = service_env(models, workdir / "data", port, COSYAPP_AGENT_CHAT="openai", COSYAPP_AGENT_CHAT_URL=chat.url,
                          **settings)
        with start_service(port, env, workdir / "service.log", cwd=workdir, log_lines=40) as service:
            yield service


def rss_mb(pid: int) -> float:
    """Resident memory of the process `pid`, in MB (Linux: /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def stats(client: httpx.Client, url: str) -> dict:
    return client.get(f"{url}/stats", timeout=10).json()


def wait_until_idle(client: httpx.Client, url: str, timeout_s: float) -> tuple[bool, float, dict]:
    """(whether /stats showed nothing in flight within `timeout_s`, seconds it took, the last /stats)."""
    started = time.monotonic()
    while True:
        current = stats(client, url)
        waited = time.monotonic() - started
        if current["in_flight"] == 0 and current["active"] == 0:
            return True, waited, current
        if waited > timeout_s:
            return False, waited, current
        time.sleep(0.02)


def settled_rss(url: str, pid: int) -> float:
    """RSS (MB) once the service is idle and has had the time to hand freed memory back."""
    with httpx.Client(timeout=10, trust_env=False) as client:
        wait_until_idle(client, url, 120)
    time.sleep(RELEASE_INTERVAL_S + 1)
    return rss_mb(pid)


def codec_codebooks(url: str) -> int:
    """How many codebooks the service's Fish codec has (from encoding the prompt recording)."""
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        answer = client.post("/v1/vqgan/encode", json={"audios": [PROMPT_B64]})
        answer.raise_for_status()
        return len(answer.json()["tokens"][0])


@dataclass
class HealthProbe:
    """GET /health every `interval_s` while a load runs; the latencies (a failure or timeout counts as its
    timeout)."""

    url: str
    interval_s: float = 0.1
    timeout_s: float = 5.0
    latencies: list[float] = field(default_factory=list)
    failures: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=self.timeout_s, trust_env=False) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    ok = (await client.get(f"{self.url}/health")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - started)
                self.failures += not ok
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval_s)

    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99)) if self.latencies else 0.0

