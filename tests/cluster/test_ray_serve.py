"""The service as a Ray Serve deployment (`cosyapp serve --ray`) on a local Ray cluster of two nodes (the head and
one worker, each its own raylet, one core each), with a real redis-server as the shared store: two replicas on
the tiny models (CosyVoice2, and Fish for the live socket), one per node, behind Serve's HTTP proxy.

Kept small for a shared 2-core machine: one CPU per node, 80 MB object stores, no dashboard."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from pathlib import Path

import httpx
import httpx_ws
import ormsgpack
import pytest

from cosyapp.config import ConfigError, load_settings
from cosyapp.service_process import free_port

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (the `cluster` extra: pip install -e '.[cluster]')")
serve = pytest.importorskip("ray.serve")

from ray.cluster_utils import Cluster  # noqa: E402

from cosyapp.cluster.deployment import APP_NAME, DEPLOYMENT_NAME, deploy, deployment_options  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = REPO_ROOT / "asset" / "zero_shot_prompt.wav"
API_KEY = "cluster-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}
OBJECT_STORE_BYTES = 80 * 2**20
BYTES_PER_TOKEN = 1920  # CosyVoice2: 40 ms of 24 kHz s16le audio per speech token


def test_deployment_options_follow_the_config() -> None:
    settings = load_settings(REPO_ROOT / "config.toml", env={
        "COSYAPP_ENGINE_MAX_CONCURRENT": "6", "COSYAPP_ENGINE_MAX_QUEUE": "3", "COSYAPP_CLUSTER_MAX_REPLICAS": "4",
        "COSYAPP_STORAGE_SHARED_STORE": "redis://store:6380/0", "COSYAPP_CLUSTER_CPUS_PER_REPLICA": "4"})
    options = deployment_options(settings)
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 6}
    assert options["max_ongoing_requests"] == 9  # the replica's slots and queue places; more wait at the proxy
    assert options["ray_actor_options"] == {"num_cpus": 4.0, "num_gpus": 1.0}
    local_disk = dataclasses.replace(settings.storage, shared_store="")
    with pytest.raises(ConfigError, match="needs \\[storage\\] shared_store"):
        deployment_options(dataclasses.replace(settings, storage=local_disk))


@pytest.fixture(scope="module")
def cluster():
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES,
                                                         "include_dashboard": False})
    head.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
    ray.init(address=head.address, log_to_driver=False)
    try:
        yield head
    finally:
        serve.shutdown()
        ray.shutdown()
        head.shutdown()


@pytest.fixture(scope="module")
def url(cluster, redis_url: str, tiny_cosyvoice2_dir: Path, tiny_fish_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> str:
    env = {
        "COSYAPP_SERVER_HOST": "127.0.0.1",
        "COSYAPP_SERVER_PORT": str(free_port()),
        "COSYAPP_SERVER_API_KEY": API_KEY,
        "COSYAPP_MODEL_BACKEND": "cosyvoice2",
        "COSYAPP_MODEL_MODEL_DIR": str(tiny_cosyvoice2_dir),
        "COSYAPP_MODEL_EXTRA_BACKEND": "fish",
        "COSYAPP_MODEL_EXTRA_MODEL_DIR": str(tiny_fish_dir),
        "COSYAPP_MODEL_DEVICE": "cpu",
        "COSYAPP_ENGINE_MAX_CONCURRENT": "2",
        # No queue in a replica: Serve lets at most max_concurrent requests reach one (max_ongoing_requests) and
        # holds the rest at the proxy, so concurrent streams are spread over both replicas, two each.
        "COSYAPP_ENGINE_MAX_QUEUE": "0",
        "COSYAPP_STORAGE_DATA_DIR": str(tmp_path_factory.mktemp("cluster_data")),
        "COSYAPP_STORAGE_SHARED_STORE": redis_url,
        "COSYAPP_CLUSTER_MIN_REPLICAS": "2",
        "COSYAPP_CLUSTER_MAX_REPLICAS": "2",
        "COSYAPP_CLUSTER_GPUS_PER_REPLICA": "0",
        "COSYAPP_CLUSTER_CPUS_PER_REPLICA": "1",
    }
    return deploy(load_settings(REPO_ROOT / "config.toml", env=env))


def replica_of(response: httpx.Response) -> str:
    return response.headers["x-replica-id"]


def synthesize(url: str, text: str, tokens: int, **fields: str) -> httpx.Response:
    return httpx.post(f"{url}/synthesize", data={"text": text, "fixed_length": str(tokens), **fields}, headers=AUTH,
                      timeout=120)


def test_requests_spread_over_both_replicas_behind_the_api_key(url: str) -> None:
    replicas = {replica_of(httpx.get(f"{url}/health", timeout=30)) for _ in range(24)}
    assert len(replicas) == 2
    assert httpx.get(f"{url}/model_info", timeout=30).status_code == 401  # the API key, as on one box
    info = httpx.get(f"{url}/model_info", headers=AUTH, timeout=30)
    assert info.status_code == 200 and info.json()["model_type"] == "CosyVoice2"


def test_a_speaker_added_through_one_replica_is_used_by_the_other(url: str) -> None:
    added = httpx.post(f"{url}/add_speaker", data={"name": "clerk", "reference_text": "欢迎光临"}, headers=AUTH,
                       files={"audio_file": ("clerk.wav", PROMPT.read_bytes(), "audio/wav")}, timeout=120)
    assert added.status_code == 200, added.text
    by_replica: dict[str, httpx.Response] = {}
    for _ in range(24):
        answer = synthesize(url, "你好。", 10, speaker="clerk")
        by_replica.setdefault(replica_of(answer), answer)
        if len(by_replica) == 2:
            break
    assert len(by_replica) == 2 and replica_of(added) in by_replica
    for answer in by_replica.values():
        assert answer.status_code == 200 and len(answer.content) == 10 * BYTES_PER_TOKEN, answer.text[:200]
    # Removed through one replica: unknown to every replica at once (no stale cached voice).
    removed = httpx.post(f"{url}/delete_speaker", data={"name": "clerk"}, headers=AUTH, timeout=30)
    assert removed.status_code == 200, removed.text
    for _ in range(6):
        answer = synthesize(url, "你好。", 10, speaker="clerk")
        assert answer.status_code == 400 and "unknown speaker 'clerk'" in answer.json()["detail"]


def test_synthesize_streams_through_the_proxy(url: str) -> None:
    arrivals: list[float] = []
    form = {"text": "欢迎光临。", "fixed_length": "200"}
    with httpx.stream("POST", f"{url}/synthesize", data=form, headers=AUTH, timeout=120) as response:
        assert response.status_code == 200 and response.headers["x-sample-rate"] == "24000"
        body = b""
        for piece in response.iter_bytes():
            arrivals.append(time.monotonic())
            body += piece
    assert len(body) == 200 * BYTES_PER_TOKEN
    assert len(arrivals) > 2 and arrivals[-1] - arrivals[0] > 0.05  # pieces as they are made, not one at the end


def test_a_live_socket_session_through_the_proxy(url: str) -> None:
    client = httpx.Client(base_url=url, headers=AUTH, timeout=120)
    with httpx_ws.connect_ws("/v1/tts/live", client=client) as ws:
        assert "x-replica-id" in ws.response.headers
        ws.send_bytes(ormsgpack.packb({"event": "start", "request": {"text": "", "format": "pcm",
                                                                      "max_new_tokens": 20}}))
        for text in ("Hello there. ", "Spoken as it comes."):
            ws.send_bytes(ormsgpack.packb({"event": "text", "text": text}))
        ws.send_bytes(ormsgpack.packb({"event": "stop"}))
        events = []
        while not events or events[-1]["event"] != "finish":
            events.append(ormsgpack.unpackb(ws.receive_bytes(timeout=120)))
    assert events[-1]["reason"] == "stop"
    audio = b"".join(event["audio"] for event in events if event["event"] == "audio")
    assert len(audio) > 0 and len(audio) % 2 == 0


def _read_stream(url: str, tokens: int, streaming: threading.Barrier, replicas: list[str]
                 ) -> tuple[str, int, str | None]:
    """One streaming /synthesize read to its end: (replica, bytes received, the error that cut it, if any).
    Notes its replica in `replicas` and waits at `streaming` once its first audio arrived."""
    with httpx.stream("POST", f"{url}/synthesize", data={"text": "欢迎光临。", "fixed_length": str(tokens)},
                      headers=AUTH, timeout=120) as response:
        replica, received = replica_of(response), 0
        replicas.append(replica)
        try:
            for piece in response.iter_bytes():
                if not received:
                    streaming.wait(timeout=60)
                received += len(piece)
        except httpx.HTTPError as e:
            return replica, received, type(e).__name__
    return replica, received, None


def test_killing_a_replica_mid_stream_fails_only_its_streams(url: str) -> None:
    tokens, count = 800, 4  # long enough to be cut mid-stream on the tiny model
    streaming, replicas = threading.Barrier(count + 1), []
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        streams = [pool.submit(_read_stream, url, tokens, streaming, replicas) for _ in range(count)]
        streaming.wait(timeout=60)  # every stream has its first audio: two on each replica (see `url`)
        victim = replicas[0]
        actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{victim}", namespace="serve")
        ray.kill(actor, no_restart=True)
        results = [stream.result(timeout=300) for stream in streams]
    on_victim = [result for result in results if result[0] == victim]
    survivors = [result for result in results if result[0] != victim]
    assert len(on_victim) == len(survivors) == 2, results
    for _, received, error in on_victim:
        assert error is not None and received < tokens * BYTES_PER_TOKEN, results  # cut off
    for _, received, error in survivors:
        assert error is None and received == tokens * BYTES_PER_TOKEN, results  # untouched
    # The next requests succeed (on the surviving replica until Serve has replaced the dead one).
    for _ in range(4):
        answer = synthesize(url, "你好。", 10)
        assert answer.status_code == 200 and len(answer.content) == 10 * BYTES_PER_TOKEN, answer.text[:200]
