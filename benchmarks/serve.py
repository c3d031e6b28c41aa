"""Serving benchmark: the multi-task skeleton server against dense serving, on loopback.

    python benchmarks/serve.py RUN_OR_SKELETON ... [--requests 600 --clients 12]

Starts real `skeleton-serve` processes and drives each with the same bounded closed loop: a fixed
number of requests (one real dev input each, tasks mixed in a fixed shuffled order) from a few
concurrent clients, each sending its next request when the last one returned. Configurations:

  (a) skeleton  one process, one dense backbone, every task on its pruned view
  (b) dense     the same server with `--dense`: every task on the dense weights, its own prompt + head
  (c) per-task  one dense process per task (skipped with --no-per-task)

Prints throughput, p50/p99 latency, the batch sizes the dynamic batcher reached, resident memory
(RSS of the server processes) and the tensor-bytes table, and checks that (a) answers what each
single-task `load_skeleton` model answers. Not a test: its figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---- inputs ------------------------------------------------------------------------------------------
def task_inputs(paths, data_dir: Path, n: int, seed: int) -> dict[str, list]:
    """`n` real dev inputs per task, in the task's own field names."""
    from skeleton.data import find_local
    from skeleton.export import read_meta
    from skeleton.serve.multitask import input_fields
    from skeleton.tasks import get_task, read_split

    out = {}
    for path in paths:
        spec = get_task(read_meta(path)["task"])
        rows = read_split(spec, find_local(spec, "dev", data_dir))
        random.Random(seed).shuffle(rows)
        fields = input_fields(spec)
        out[spec.name] = [{f: row[f] for f in fields} for row in rows[:n]]
    return out


def request_plan(inputs: dict[str, list], total: int, seed: int) -> list[tuple[str, list]]:
    """`total` one-input requests cycling over the tasks, in a fixed shuffled order."""
    tasks = sorted(inputs)
    plan = [(tasks[i % len(tasks)], [inputs[tasks[i % len(tasks)]][i // len(tasks) % len(inputs[tasks[0]])]])
            for i in range(total)]  # fmt: skip
    random.Random(seed).shuffle(plan)
    return plan


# ---- servers -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `skeleton-serve` process on a free loopback port."""

    def __init__(self, paths, args, dense: bool = False):
        self.port = _free_port()
        cmd = [sys.executable, "-m", "skeleton.serve.server", *map(str, paths), "--port", str(self.port),
               "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
               "--threads", str(args.threads)]  # fmt: skip
        if dense:
            cmd.append("--dense")
        if args.kernel_cache is not None:
            cmd += ["--kernel-cache", str(args.kernel_cache)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        raise RuntimeError("server did not start")

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def peak_rss(self) -> int:
        from skeleton.serve.server import resident_bytes

        return resident_bytes("VmHWM", self.proc.pid) or self.rss()

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


# ---- load ----------------------------------------------------------------------------------------------
def closed_loop(route, plan, clients: int) -> dict:
    """Run `plan` from `clients` concurrent closed-loop clients; latency per request, total wall time."""
    local = threading.local()

    def one(job):
        task, inputs = job
        port = route(task)
        pool = local.__dict__.setdefault("clients", {})
        if port not in pool:
            pool[port] = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        started = time.perf_counter()
        r = pool[port].post("/predict", json={"task": task, "inputs": inputs})
        latency = time.perf_counter() - started
        r.raise_for_status()
        return latency, r.json()["predictions"]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, plan))
    wall = time.perf_counter() - started
    return {
        "requests": len(plan),
        "wall_s": wall,
        "throughput": len(plan) / wall,
        "latencies": [r[0] for r in results],
        "predictions": [r[1][0] for r in results],
    }


def measure(name, servers: dict, plan, args, repeats: int = 1, others=()) -> dict:
    """Warm up, then the measured closed loop `repeats` times; servers maps task -> Server.

    `others` are configurations measured in turn with this one (each a (name, servers) pair), so a
    change in the machine's background load hits every configuration alike."""
    configs = [(name, servers), *others]
    routes = {n: {t: s.port for t, s in srv.items()}.__getitem__ for n, srv in configs}
    for n, _ in configs:
        closed_loop(routes[n], plan[: args.warmup], args.clients)
    runs = {n: [] for n, _ in configs}
    for _ in range(repeats):
        for n, _ in configs:
            runs[n].append(closed_loop(routes[n], plan, args.clients))
    return [_combine(n, runs[n], srv) for n, srv in configs]


def _combine(name, runs: list[dict], servers: dict) -> dict:
    latencies = sorted(x for r in runs for x in r["latencies"])
    wall, requests = sum(r["wall_s"] for r in runs), sum(r["requests"] for r in runs)
    unique = list({id(s): s for s in servers.values()}.values())
    return {
        "name": name,
        "requests": requests,
        "wall_s": wall,
        "throughput": requests / wall,
        "throughput_runs": [r["throughput"] for r in runs],
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "predictions": runs[0]["predictions"],
        "rss_bytes": sum(s.rss() for s in unique),
        "peak_rss_bytes": sum(s.peak_rss() for s in unique),
        "stats": {k: v for s in unique for k, v in s.client.get("/stats").json().items()},
        "memory": unique[0].client.get("/memory").json(),
    }


# ---- checks ----------------------------------------------------------------------------------------
def agreement(paths, plan, predictions) -> dict:
    """Labels (or values) of (a) against each single-task load_skeleton model on the same inputs."""
    import torch

    from skeleton.export import load_skeleton, read_meta
    from skeleton.serve.multitask import MultiTaskModel

    models = {read_meta(p)["task"]: load_skeleton(p) for p in paths}
    helper = MultiTaskModel.from_artifacts(paths)  # only its input encoding is used
    same, max_diff = 0, 0.0
    for (task, inputs), got in zip(plan, predictions):
        enc = helper.encode(task, inputs)
        batch = helper.tasks[task].collate(enc.items)
        with torch.inference_mode():
            scores = models[task](batch).float().reshape(-1)
        expected = helper.tasks[task].spec.labels
        ref = scores.tolist()
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(ref, got["scores"])))
        if expected is None:
            same += abs(got["value"] - ref[0]) < 1e-4
        else:
            same += got["label"] == expected[int(scores.argmax())]
    return {"agree": same, "of": len(plan), "max_score_diff": max_diff}


# ---- report ----------------------------------------------------------------------------------------
def _mb(b) -> str:
    return f"{b / 2**20:.1f}"


def print_report(results: list[dict], dense_one_rss: int, dense_one_peak: int, checks: dict, args) -> None:
    base = next(r for r in results if r["name"].startswith("(b)"))
    print(f"\n{args.repeats} x {args.requests} requests of 1 input, {args.clients} closed-loop clients, tasks mixed; "
          f"max batch {args.max_batch_size}, max wait {args.max_wait_ms} ms, {args.threads} torch threads"
          f"{'' if args.kernel_cache is None else f', --kernel-cache {args.kernel_cache}'}\n")  # fmt: skip
    print(
        "| server | throughput (req/s) | vs (b) | p50 ms | p99 ms | mean batch per task | RSS MB | RSS vs one dense "
        "| peak RSS MB | peak vs one dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        batches = ", ".join(f"{t} {s['mean_batch']}" for t, s in sorted(r["stats"].items()))
        print(f"| {r['name']} | {r['throughput']:.1f} | x{r['throughput'] / base['throughput']:.2f} | "
              f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {batches} | {_mb(r['rss_bytes'])} | "
              f"x{r['rss_bytes'] / dense_one_rss:.2f} | {_mb(r['peak_rss_bytes'])} | "
              f"x{r['peak_rss_bytes'] / dense_one_peak:.2f} |")  # fmt: skip
    print(f"\none dense model served alone (`--dense`, one task): RSS {_mb(dense_one_rss)} MB, "
          f"peak {_mb(dense_one_peak)} MB")  # fmt: skip
    mem = next(r for r in results if r["name"].startswith("(a)"))["memory"]
    n = len(mem["task_bytes"])
    print("\n| tensor memory | MB |\n|---|---|")
    print(f"| shared backbone (held once) | {_mb(mem['shared_bytes'])} |")
    for task, b in sorted(mem["task_bytes"].items()):
        print(f"| {task}: own FFN slices + prompt + head | {_mb(b)} |")
    print(f"| **multi-task total, {n} tasks** | **{_mb(mem['total_bytes'])}** "
          f"(x{mem['total_bytes'] / mem['dense_model_bytes']:.2f} one dense) |")  # fmt: skip
    print(f"| {n} separate pruned models | {_mb(mem['separate_pruned_bytes'])} |")
    print(f"| {n} dense models | {_mb(mem['separate_dense_bytes'])} |")
    print(
        f"\n(a) vs single-task load_skeleton: {checks['agree']}/{checks['of']} same labels/values, "
        f"max |score diff| {checks['max_score_diff']:.2e}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="skeleton folders or run folders, one per task")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="(a) and (b) measured in turn this often")
    p.add_argument("--no-per-task", action="store_true", help="skip (c), one dense process per task")
    p.add_argument("--kernel-cache", type=int, help="start every server with --kernel-cache N")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    from skeleton.export import read_meta, resolve_artifact

    paths = [resolve_artifact(x) for x in args.paths]
    inputs = task_inputs(paths, Path(args.data), 400, seed=0)
    plan = request_plan(inputs, args.requests, seed=0)
    skeleton, dense = Server(paths, args), Server(paths, args, dense=True)
    try:
        results = measure("(a) skeleton, one process", dict.fromkeys(inputs, skeleton), plan, args,
                          args.repeats, [("(b) dense + prompt/head swap", dict.fromkeys(inputs, dense))])  # fmt: skip
    finally:
        skeleton.close()
        dense.close()
    per_task = {}
    try:
        for path in paths:
            per_task[read_meta(path)["task"]] = Server([path], args, dense=True)
        if not args.no_per_task:
            results += measure(f"(c) {len(paths)} dense processes", per_task, plan, args)
        alone = min(per_task.values(), key=Server.rss)  # one dense model, one task, alone
        dense_one_rss, dense_one_peak = alone.rss(), alone.peak_rss()
    finally:
        for s in per_task.values():
            s.close()
    checks = agreement(paths, plan, results[0]["predictions"])
    print_report(results, dense_one_rss, dense_one_peak, checks, args)
    if args.json:
        slim = [{k: v for k, v in r.items() if k != "predictions"} for r in results]
        Path(args.json).write_text(json.dumps({"results": slim, "dense_one_rss": dense_one_rss,
                                               "dense_one_peak": dense_one_peak,
                                               "checks": checks, "args": vars(args)}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
