"""`[cluster]` -> a Ray Serve deployment of the service, and `cosyapp serve --ray`.

Each replica is a Ray actor that builds the service's Starlette app (`create_app`, the same as on one box) and
serves it through `serve.ingress`: Ray Serve's HTTP proxy (one per node, on `[server] host`/`port`) takes every
route, streams the responses and carries the WebSocket sessions; it sends each request to the replica with the
fewest requests in flight of two picked at random. A replica reserves `gpus_per_replica` GPUs and
`cpus_per_replica` cores; Ray Serve adds replicas between `min_replicas` and `max_replicas` when the requests in
flight per replica pass `target_ongoing_requests`, and lets at most that many plus `[engine] max_queue` reach one
replica (the rest wait at the proxy instead of being answered 503 by a full replica).

The replicas share `[storage] shared_store`: with more than one replica a store on the local disk would give
each replica its own speakers and tasks, so that is refused. The settings are read once, where the command runs,
and sent to every replica: model and data paths must be the same on every node.
"""

from __future__ import annotations

import math
import signal
import threading
from typing import Any, Callable

import ray
from ray import serve

from cosyapp.cluster.replica_app import ReplicaApp
from cosyapp.config import AUTO, ConfigError, Settings
from cosyapp.engine.sizing import MIN_STREAMS
from cosyapp.server.app import create_app

APP_NAME = "cosyapp"
DEPLOYMENT_NAME = "cosyapp"
# Requests in flight per GPU replica the autoscaler aims at when neither it nor max_concurrent is a number.
GPU_TARGET_WHEN_AUTO = 8
HEALTH_CHECK_PERIOD_S = 10.0


def target_ongoing_requests(settings: Settings) -> int:
    """`[cluster] target_ongoing_requests`, or from `[engine] max_concurrent` (each replica's streams at once); with
    both "auto": a CPU replica's automatic size (a stream per reserved core, at least MIN_STREAMS), or
    GPU_TARGET_WHEN_AUTO on GPU replicas (whose size depends on the memory of a GPU this process cannot see)."""
    cluster, engine = settings.cluster, settings.engine
    if cluster.target_ongoing_requests != AUTO:
        return int(cluster.target_ongoing_requests)
    if engine.max_concurrent != AUTO:
        return int(engine.max_concurrent)
    if cluster.gpus_per_replica > 0:
        return GPU_TARGET_WHEN_AUTO
    return max(MIN_STREAMS, math.ceil(cluster.cpus_per_replica))


def deployment_options(settings: Settings) -> dict[str, Any]:
    """The Ray Serve deployment options `[cluster]` and `[engine]` give."""
    cluster = settings.cluster
    if cluster.max_replicas > 1 and not settings.storage.shared_store:
        raise ConfigError("[cluster] max_replicas > 1 needs [storage] shared_store (redis://host:port/db): replicas "
                          "on their own disks would not share speakers and tasks")
    target = target_ongoing_requests(settings)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cluster.cpus_per_replica, "num_gpus": cluster.gpus_per_replica},
        "max_ongoing_requests": target + settings.engine.max_queue,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
    }
    if cluster.min_replicas == cluster.max_replicas:
        options["num_replicas"] = cluster.max_replicas
    else:
        options["autoscaling_config"] = {"min_replicas": cluster.min_replicas, "max_replicas": cluster.max_replicas,
                                         "target_ongoing_requests": target}
    return options


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class CosyappReplica:
    """One replica: the service's app, built in the replica's own process (its models load there)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.replica: ReplicaApp | None = None

    def __serve_build_asgi_app__(self) -> ReplicaApp:
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.replica = ReplicaApp(create_app(self.settings), replica_id)
        return self.replica

    def check_health(self) -> None:
        if self.replica is None:
            raise RuntimeError("the service app is not built yet")
        self.replica.check_health()


def application(settings: Settings) -> serve.Application:
    return CosyappReplica.options(**deployment_options(settings)).bind(settings)


def deploy(settings: Settings) -> str:
    """Deploy (or update) the service on the Ray cluster this process is connected to; returns its URL once every
    replica is ready."""
    server = settings.server
    serve.start(http_options={"host": server.host, "port": server.port})
    serve.run(application(settings), name=APP_NAME, route_prefix="/")
    return f"http://{server.host}:{server.port}"


def run(settings: Settings, on_ready: Callable[[str], None]) -> None:
    """`cosyapp serve --ray`: join the cluster, deploy, and keep the service up until Ctrl-C or SIGTERM, then
    remove it (a cluster started here with `address = "local"` stops with it)."""
    deployment_options(settings)  # a config error before Ray starts
    local = settings.cluster.address == "local"
    ray.init(address=None if local else settings.cluster.address, include_dashboard=False if local else None,
             log_to_driver=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        on_ready(deploy(settings))
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
        ray.shutdown()
