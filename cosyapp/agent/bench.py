"""Agent latency benchmark (`cosyapp bench agent`): how soon a streamed /run answer starts to speak.

One streamed POST /run per run; the client notes when each data line arrives, and from that prints the time to
the first text, the time to the first audio, when the answer was fully written and fully spoken, and per spoken
sentence: when its text was complete (the same sentence cutting as the service, applied to the text received)
and when its first audio arrived. With a chat model that streams, the first audio follows the first sentence,
not the whole answer.

The chat model is whatever the service uses (`--url`), or, for a service the benchmark starts itself, a given
OpenAI-compatible endpoint (`chat_url`) or a scripted one that streams a fixed answer at a known pace
(`scripted_chat.ScriptedChat`)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import soundfile

from cosyapp.agent.scripted_chat import ScriptedChat
from cosyapp.server.text_segments import TextSegmenter
from cosyapp.service_process import free_port, start_service

BENCH_MESSAGE = "Plan a short walk through the old town for me."
SCRIPTED_ANSWER = ("Let us start at the market square, where the morning stalls open early. "
                   "From there, walk down the narrow lane to the river and cross the stone bridge. "
                   "On the far bank you will find a small cafe with a view of the cathedral. "
                   "After a coffee, follow the city wall back up the hill to the castle gardens.")


@dataclass(frozen=True)
class AgentBenchPlan:
    message: str = BENCH_MESSAGE
    runs: int = 3
    min_sentence_chars: int = 10
    max_sentence_chars: int = 200


def measure_run(url: str, plan: AgentBenchPlan, headers: dict[str, str]) -> dict[str, Any]:
    """One streamed /run, timed line by line."""
    segmenter = TextSegmenter(plan.min_sentence_chars, plan.max_sentence_chars)
    sentences_done: list[float] = []
    first_audio: dict[int, float] = {}
    audio_s: dict[int, float] = {}
    text, first_text, last_text, last_audio = "", None, None, None
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/run", json={"input": {"message": plan.message}}, headers=headers,
                      timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"/run answered {response.status_code}: {response.read().decode()[:300]}")
        for line in response.iter_lines():
            if not line:
                continue
            now = time.perf_counter() - started
            event = json.loads(line[len("data: "):])
            if event["type"] == "text":
                first_text = now if first_text is None else first_text
                last_text = now
                text += event["content"]
                sentences_done += [now] * len(segmenter.add(event["content"]))
            elif event["type"] == "audio":
                sentence = event.get("sentence", 0)
                first_audio.setdefault(sentence, now)
                samples, rate = soundfile.read(io.BytesIO(base64.b64decode(event["content"])))
                audio_s[sentence] = audio_s.get(sentence, 0.0) + samples.shape[0] / rate
                last_audio = now
            elif event["type"] == "error":
                raise RuntimeError(f"the answer failed: {event['content']}")
    sentences_done += [last_text or 0.0] * len(segmenter.flush())
    return {"first_text_s": first_text, "first_audio_s": first_audio.get(0), "written_s": last_text,
            "spoken_s": last_audio, "text_chars": len(text),
            "sentences": [{"text_done_s": sentences_done[i] if i < len(sentences_done) else None,
                           "first_audio_s": first_audio[i], "audio_s": audio_s[i]} for i in sorted(first_audio)]}


@contextlib.contextmanager
def started_service(model_dir: Path | None, backend: str, device: str, chat_url: str | None, chat_model: str,
                    words_per_s: float) -> Iterator[tuple[str, str]]:
    """A service started for the benchmark (on a tiny random model when no model_dir is given) with its chat
    model; yields (its URL, what the chat model is)."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cosyapp-bench-agent-")))
        if model_dir is None:
            from cosyapp.engine.registry import make_tiny

            model_dir = workdir / "tiny"
            make_tiny(backend, model_dir, size="tiny")
        if chat_url is None:
            scripted = stack.enter_context(ScriptedChat(SCRIPTED_ANSWER, words_per_s))
            chat_url, chat_model, chat = scripted.url, "scripted", f"scripted, {words_per_s:g} words/s"
        else:
            chat = f"{chat_url} ({chat_model})"
        port = free_port()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("COSYAPP_")},
               "COSYAPP_SERVER_HOST": "127.0.0.1", "COSYAPP_SERVER_PORT": str(port),
               "COSYAPP_MODEL_BACKEND": backend, "COSYAPP_MODEL_MODEL_DIR": str(model_dir),
               "COSYAPP_MODEL_DEVICE": device, "COSYAPP_STORAGE_DATA_DIR": str(workdir / "data"),
               "COSYAPP_AGENT_CHAT": "openai", "COSYAPP_AGENT_CHAT_URL": chat_url,
               "COSYAPP_AGENT_CHAT_MODEL": chat_model}
        service = stack.enter_context(start_service(port, env, workdir / "service.log", log_lines=40))
        yield service.url, f"{chat}; service on {backend} {model_dir}"


def run_agent_bench(plan: AgentBenchPlan, url: str, chat: str, api_key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    runs = [measure_run(url.rstrip("/"), plan, headers) for _ in range(plan.runs)]
    return {"url": url, "chat": chat, "plan": plan.__dict__, "runs": runs}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f}"


def format_agent_report(report: dict[str, Any]) -> str:
    lines = [f"agent benchmark: {report['url']}, chat model: {report['chat']}",
             f"message: {report['plan']['message']!r}, {report['plan']['runs']} run(s), streamed /run", "",
             f"{'run':>3} {'first text ms':>14} {'first audio ms':>15} {'written ms':>11} {'spoken ms':>10} "
             f"{'sentences':>10}"]
    for index, run in enumerate(report["runs"], 1):
        lines.append(f"{index:>3} {_ms(run['first_text_s']):>14} {_ms(run['first_audio_s']):>15} "
                     f"{_ms(run['written_s']):>11} {_ms(run['spoken_s']):>10} {len(run['sentences']):>10}")
    last = report["runs"][-1]
    lines += ["", f"per sentence (run {len(report['runs'])}): text complete -> first audio",
              f"{'sentence':>8} {'text done ms':>13} {'first audio ms':>15} {'after text ms':>14} {'audio s':>8}"]
    for index, sentence in enumerate(last["sentences"]):
        done = sentence["text_done_s"]
        after = None if done is None else sentence["first_audio_s"] - done
        lines.append(f"{index:>8} {_ms(done):>13} {_ms(sentence['first_audio_s']):>15} {_ms(after):>14} "
                     f"{sentence['audio_s']:>8.2f}")
    return "\n".join(lines)


def run_embedded_chat_bench(device: str, tokens: int, runs: int) -> dict[str, Any]:
    """Load time and decoding speed of the embedded chat model, in this process (greedy, `tokens` tokens a run;
    the time to the first piece includes the prompt)."""
    import threading

    from cosyapp.agent.embedded import LoadedModel

    started = time.perf_counter()
    model = LoadedModel(device)
    load_s = time.perf_counter() - started
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": BENCH_MESSAGE}]
    results = []
    for _ in range(runs):
        pieces: list[float] = []
        begun = time.perf_counter()
        never = threading.Event()
        model.generate(messages, 0.0, tokens, lambda _: pieces.append(time.perf_counter() - begun), never)
        total = time.perf_counter() - begun
        after_first = total - pieces[0] if pieces else 0.0
        results.append({"pieces": len(pieces), "first_piece_s": pieces[0] if pieces else None, "total_s": total,
                        "tokens_per_s": (len(pieces) - 1) / after_first if after_first > 0 else None})
    return {"device": str(model.device), "load_s": load_s, "tokens": tokens, "runs": results,
            "cpu_threads": __import__("torch").get_num_threads(), "load_average": os.getloadavg()}


def format_embedded_chat_report(report: dict[str, Any]) -> str:
    lines = [f"embedded chat model (SmolLM2-135M-Instruct Q4_1 via transformers, float32) on {report['device']}, "
             f"{report['cpu_threads']} torch threads, load average {report['load_average'][0]:.1f}",
             f"load: {report['load_s']:.1f} s (import + GGUF dequantization + weights)", "",
             f"{'run':>3} {'pieces':>7} {'first piece ms':>15} {'total s':>8} {'tokens/s':>9}"]
    for index, run in enumerate(report["runs"], 1):
        rate = "-" if run["tokens_per_s"] is None else f"{run['tokens_per_s']:.1f}"
        lines.append(f"{index:>3} {run['pieces']:>7} {_ms(run['first_piece_s']):>15} {run['total_s']:>8.2f} "
                     f"{rate:>9}")
    return "\n".join(lines)
