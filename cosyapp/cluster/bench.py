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
import os
import tempfile
import time
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


def cluster_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by the local Ray cluster this process started (its descendant processes, from
    Linux /proc): by the replicas, and by the rest of Ray (proxy, controller, raylets, GCS)."""
    tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
    parents, cpu, replicas = {}, {}, set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            after_name = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue  # ended meanwhile
        pid = int(stat.parent.name)
        parents[pid] = int(after_name[1])
        cpu[pid] = (int(after_name[11]) + int(after_name[12])) * tick_s  # utime + stime
        if b"ServeReplica:" in command:
            replicas.add(pid)
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - mine
        mine |= frontier
    return {"replicas": sum(cpu[pid] for pid in mine & replicas), "ray": sum(cpu[pid] for pid in mine - replicas)}


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
                cpu_before, started = cluster_cpu_s(), time.perf_counter()
                report = run_service_bench(plan, url=url, api_key=settings.server.api_key or None)
                wall_s, cpu_after = time.perf_counter() - started, cluster_cpu_s()
                report["cluster_cores"] = {part: (cpu_after[part] - cpu_before[part]) / wall_s for part in cpu_after}
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
                 f"{'first audio p95 ms':>19} {'s/s per replica core':>21}  cores replicas/ray/machine")
    base = None
    for report in reports:
        cluster = report["cluster_cores"]
        for level in report["levels"]:
            machine = sum(value for value in level["cpu_cores"].values() if value is not None)
            throughput = level["audio_s_per_s"]
            base = base if base is not None else throughput
            p95 = level["first_audio_s"]["p95"]
            lines.append(f"{report['replicas']:>8} {report['cores']:>6} {level['name']:>6} {throughput:>10.2f} "
                         f"{'x%.2f' % (throughput / base) if base else '-':>7} "
                         f"{'-' if p95 is None else f'{1000 * p95:.0f}':>19} "
                         f"{throughput / cluster['replicas'] if cluster['replicas'] else 0:>21.2f}  "
                         f"{cluster['replicas']:.2f}/{cluster['ray']:.2f}/{machine:.2f}")
    lines.append("cores: CPU cores kept busy by the replicas and by the rest of Ray (over the whole run, warm-up "
                 "included), and by the whole machine during the level (other users of a shared machine too)")
    return "\n".join(lines)
