"""`cosyapp bench cluster`: the service's load benchmark against a Ray Serve deployment of 1, 2, ... replicas
on this machine, one after the other, with the same total cores and synthesis slots, so the table says what
more replicas add here (on one machine: at most what its cores allow).

Each run starts a local Ray cluster (no dashboard, a small object store), deploys the service with `[cluster]`
set to N replicas of `cores / N` CPUs each (or one GPU each) and `[engine] max_concurrent` of
`ceil(slots / N)`, runs `bench_service`'s plan against Serve's proxy, and stops Ray. More than one replica needs
the shared store: `[storage] shared_store`, or a throwaway redis-server started for the benchmark.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import serve

from cosyapp.bench_service import LoadPlan, format_service_report, run_service_bench
from cosyapp.cluster.deployment import deploy
from cosyapp.cluster.local_redis import running_redis
from cosyapp.config import Settings
from cosyapp.service_process import free_port

OBJECT_STORE_BYTES = 100 * 2**20


def replica_settings(settings: Settings, replicas: int, cores: int, gpus_per_replica: float, slots: int,
                     shared_store: str) -> Settings:
    cluster = dataclasses.replace(settings.cluster, min_replicas=replicas, max_replicas=replicas,
                                  cpus_per_replica=cores / replicas, gpus_per_replica=gpus_per_replica)
    engine = dataclasses.replace(settings.engine, max_concurrent=math.ceil(slots / replicas))
    storage = dataclasses.replace(settings.storage, shared_store=shared_store)
    server = dataclasses.replace(settings.server, host="127.0.0.1", port=free_port())
    return dataclasses.replace(settings, cluster=cluster, engine=engine, storage=storage, server=server)


def run_cluster_bench(settings: Settings, plan: LoadPlan, replica_counts: tuple[int, ...], cores: int,
                      gpus_per_replica: float, slots: int) -> list[dict[str, Any]]:
    """One `bench_service` report per replica count (each with `replicas`, `cores` and `slots` added)."""
    reports = []
    with contextlib.ExitStack() as stack:
        shared_store = settings.storage.shared_store
        if not shared_store and max(replica_counts) > 1:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cosyapp-bench-redis-")))
            shared_store = stack.enter_context(running_redis(folder))
        for replicas in replica_counts:
            run_settings = replica_settings(settings, replicas, cores, gpus_per_replica, slots, shared_store)
            ray.init(num_cpus=cores, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                     log_to_driver=False)
            try:
                url = deploy(run_settings)
                report = run_service_bench(plan, url=url, api_key=settings.server.api_key or None)
            finally:
                serve.shutdown()
                ray.shutdown()
            reports.append({**report, "replicas": replicas, "cores": cores,
                            "slots_per_replica": run_settings.engine.max_concurrent})
    return reports


def format_cluster_report(reports: list[dict[str, Any]]) -> str:
    """Each run's table, then one line per replica count: its best level's throughput against the first run."""
    lines = []
    for report in reports:
        lines += [f"== {report['replicas']} replica(s) of {report['cores'] / report['replicas']:g} core(s), "
                  f"{report['slots_per_replica']} slots each", format_service_report(report), ""]
    lines.append(f"{'replicas':>8} {'cores':>6} {'level':>6} {'audio s/s':>10} {'vs 1st':>7} "
                 f"{'first audio p95 ms':>19} {'cores busy':>11}")
    base = None
    for report in reports:
        for level in report["levels"]:
            cpu = level["cpu_cores"]
            busy = sum(value for value in cpu.values() if value is not None)
            throughput = level["audio_s_per_s"]
            base = base if base is not None else throughput
            p95 = level["first_audio_s"]["p95"]
            lines.append(f"{report['replicas']:>8} {report['cores']:>6} {level['name']:>6} {throughput:>10.2f} "
                         f"{'x%.2f' % (throughput / base) if base else '-':>7} "
                         f"{'-' if p95 is None else f'{1000 * p95:.0f}':>19} {busy:>11.2f}")
    lines.append("cores busy: CPU cores the whole machine kept busy during the level (replicas, Ray, client)")
    return "\n".join(lines)
