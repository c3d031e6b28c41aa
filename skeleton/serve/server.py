"""`skeleton-serve`: the HTTP API over a MultiTaskModel, on FastAPI + uvicorn.

Routes: `POST /predict` ({"task", "inputs"}), `GET /tasks` (loaded tasks, their metrics, rate,
speedup and backbone hash), `POST /tasks` ({"path", "name"?}: hot registration), `DELETE
/tasks/{name}`, `GET /health`, `GET /memory` and `GET /stats` (batch sizes reached per task).

Every request is checked and tokenized in the request handler, before it joins a batch, so a bad
request gets its own 4xx and never fails the batch of the requests beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from skeleton.serve.batcher import TaskBatcher

# torch and the model code are imported lazily so that `--help` answers at once.


@dataclass
class ServeConfig:
    """Batching and input limits of one server."""

    max_batch_size: int = 32  # inputs per forward pass
    max_wait_ms: float = 5.0  # how long a batch waits for company after its first request
    max_request_inputs: int | None = None  # inputs per request; default: max_batch_size
    workers_per_device: int = 1  # concurrent forward passes per device (they share one replica)

    @property
    def request_limit(self) -> int:
        return self.max_request_inputs or self.max_batch_size


class HTTPError(Exception):
    """An error with its HTTP status, raised anywhere in a handler."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


# ---- the replicas: one MultiTaskModel per device ---------------------------------------------------
class Replicas:
    """The same tasks on each device; registration reaches every replica or none."""

    def __init__(self, models: list):
        self.models = models

    @property
    def first(self):
        return self.models[0]

    def register(self, path, name=None):
        done = []
        try:
            for model in self.models:
                done.append(model.register(path, name))
        except Exception:
            for model, entry in zip(self.models, done):
                model.unregister(entry.name)
            raise
        return done[0]

    def unregister(self, name: str) -> None:
        for model in self.models:
            model.unregister(name)

    def task_list(self) -> list[dict]:
        model = self.first
        return [dict(e.info(model.sha256), pruned=model.prune) for e in model.tasks.values()]


def _run_batch(model, task, encoded_list):
    return model.run(task, encoded_list)


def resident_bytes(field: str = "VmRSS", pid: int | str = "self") -> int | None:
    """A process's resident set size (``VmHWM``: its peak) from Linux /proc; None elsewhere."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


KERNEL_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def limit_kernel_cache(capacity: int) -> str:
    """Cap oneDNN's kernel cache (PyTorch's CPU linears) before the first forward pass; a capacity the
    user set in the environment wins. oneDNN keeps one compiled kernel, with its buffers, per distinct
    matrix shape, and a multi-task server meets many (every task's widths x every batch shape): with
    the default cache its resident memory grew by hundreds of MB under load, for no speed (README,
    Serving). Returns the capacity in force."""
    return os.environ.setdefault(KERNEL_CACHE_ENV, str(capacity))


# ---- the app -------------------------------------------------------------------------------------------
def create_app(replicas: Replicas, config: ServeConfig | None = None):
    """The FastAPI app serving `replicas` (a Replicas or a single MultiTaskModel)."""
    from skeleton.export import ArtifactError, BackboneMismatchError
    from skeleton.serve.multitask import InputError, UnknownTaskError

    if not isinstance(replicas, Replicas):
        replicas = Replicas([replicas])
    config = config or ServeConfig()
    workers = [m for m in replicas.models for _ in range(config.workers_per_device)]
    batcher = TaskBatcher(
        _run_batch, workers, max_batch_size=config.max_batch_size, max_wait_s=config.max_wait_ms / 1000
    )

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="skeleton-serve", version="1", lifespan=lifespan)
    app.state.replicas, app.state.batcher, app.state.config = replicas, batcher, config

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, err: HTTPError):
        return JSONResponse(status_code=err.status, content={"error": err.message, **err.extra})

    def loaded() -> list[str]:
        return sorted(replicas.first.tasks)

    async def json_body(request: Request, allowed: set[str], required: set[str]) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"the body must be a JSON object with {sorted(required)}")
        missing, extra = sorted(required - body.keys()), sorted(body.keys() - allowed)
        if missing or extra:
            what = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else ""]
            raise HTTPError(422, f"{', '.join(w for w in what if w)}; the body takes {sorted(allowed)}")
        return body

    @app.post("/predict")
    async def predict(request: Request):
        body = await json_body(request, {"task", "inputs"}, {"task", "inputs"})
        task, inputs = body["task"], body["inputs"]
        if not isinstance(task, str):
            raise HTTPError(422, "task must be a string", loaded_tasks=loaded())
        if isinstance(inputs, list) and len(inputs) > config.request_limit:
            raise HTTPError(
                413, f"{len(inputs)} inputs in one request; the limit is {config.request_limit}: split it"
            )
        model = replicas.first
        try:
            encoded = await run_in_threadpool(model.encode, task, inputs)
        except UnknownTaskError as err:
            raise HTTPError(404, str(err), loaded_tasks=loaded()) from None
        except InputError as err:
            raise HTTPError(422, str(err)) from None
        try:
            predictions = await batcher.submit(task, encoded, len(encoded.items))
        except UnknownTaskError as err:  # removed while the request waited
            raise HTTPError(404, str(err), loaded_tasks=loaded()) from None
        response = {"task": task, "predictions": predictions}
        if encoded.truncated:
            response["truncated"] = encoded.truncated
            response["warning"] = f"inputs {encoded.truncated} were cut to {encoded.max_length} tokens"
        return response

    @app.get("/tasks")
    async def tasks():
        model = replicas.first
        return {
            "backbone": {"name_or_path": model.backbone_name, "sha256": model.sha256},
            "tasks": replicas.task_list(),
        }

    @app.post("/tasks", status_code=201)
    async def register(request: Request):
        body = await json_body(request, {"path", "name"}, {"path"})
        try:
            entry = await run_in_threadpool(replicas.register, body["path"], body.get("name"))
        except BackboneMismatchError as err:
            raise HTTPError(409, str(err)) from None
        except ArtifactError as err:
            raise HTTPError(422, str(err)) from None
        except ValueError as err:  # a task of that name is already loaded
            raise HTTPError(409, str(err), loaded_tasks=loaded()) from None
        return entry.info(replicas.first.sha256)

    @app.delete("/tasks/{name}")
    async def unregister(name: str):
        try:
            replicas.unregister(name)
        except UnknownTaskError as err:
            raise HTTPError(404, str(err), loaded_tasks=loaded()) from None
        return {"removed": name, "loaded_tasks": loaded()}

    @app.get("/health")
    async def health():
        return {"status": "ok", "tasks": loaded()}

    @app.get("/memory")
    async def memory():
        return {
            **replicas.first.memory(),
            "rss_bytes": resident_bytes(),
            "peak_rss_bytes": resident_bytes("VmHWM"),
            "kernel_cache": os.environ.get(KERNEL_CACHE_ENV),
        }

    @app.get("/stats")
    async def stats():
        return {task: s.as_dict() for task, s in batcher.stats.items()}

    return app


# ---- the command line ------------------------------------------------------------------------------
def parse_devices(spec: str) -> list[str]:
    """`cpu`, `cuda` (every visible GPU), `cuda:0,cuda:1` or `0,1`."""
    import torch

    if spec == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("skeleton-serve: error: --devices cuda but no GPU is visible")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [d if not d.isdigit() else f"cuda:{d}" for d in spec.split(",") if d]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="skeleton-serve",
        description="Serve skeleton artifacts over HTTP: one dense backbone in memory, each task on "
        "its own pruned network, requests batched per task.",
    )
    p.add_argument("paths", nargs="*", help="skeleton artifact folders or run folders holding one")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backbone", help="dense backbone (default: the one the first artifact names)")
    p.add_argument("--seed", type=int, default=0, help="only for tiny: random backbones without paths")
    p.add_argument("--devices", default="cpu", help="cpu, cuda (all GPUs), or a list: cuda:0,cuda:1")
    p.add_argument("--workers-per-device", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32, help="inputs per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    p.add_argument("--max-request-inputs", type=int, help="inputs per request (default: max batch size)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (capped by the model)")
    p.add_argument("--truncation", choices=("truncate", "reject"), default="truncate")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--dense", action="store_true", help="baseline: every task on the dense weights")
    p.add_argument(
        "--keep-dense-ffn",
        action="store_true",
        help="keep the dense FFN weights resident (default: freed once sliced, re-read to register)",
    )
    p.add_argument(
        "--kernel-cache",
        type=int,
        default=0,
        help=f"oneDNN kernels kept per process (default 0; {KERNEL_CACHE_ENV} in the environment wins)",
    )
    p.add_argument("--log-level", default="warning")
    return p


def _refuse_duplicate_tasks(paths) -> None:
    """Two artifacts of one task (say a sweep's psi=1 and psi=2 runs) would share a name: say so."""
    from skeleton.export import read_meta

    seen: dict[str, str] = {}
    for path in paths:
        task = read_meta(path)["task"]
        if task in seen:
            raise ValueError(
                f"two artifacts for task {task!r}: {seen[task]} and {path}. Pass one per task (e.g. "
                f"'*psi=1,task={task}'), then add others under their own name with POST /tasks "
                '{"path": ..., "name": ...}'
            )
        seen[task] = str(path)


def build_replicas(args) -> Replicas:
    from skeleton.export import read_meta
    from skeleton.serve.multitask import MultiTaskModel

    if not args.paths and not args.backbone:
        raise SystemExit("skeleton-serve: error: pass skeleton folders, or --backbone to start empty")
    _refuse_duplicate_tasks(args.paths)
    meta = read_meta(args.paths[0]) if args.paths else None
    backbone = args.backbone or meta["backbone"]["name_or_path"]
    seed = meta["model"].get("seed", 0) if meta else args.seed
    models = []
    for device in parse_devices(args.devices):
        model = MultiTaskModel(
            backbone,
            seed=seed,
            device=device,
            max_length=args.max_length,
            truncation=args.truncation,
            prune=not args.dense,
        )
        for path in args.paths:
            model.register(path)
        if not args.keep_dense_ffn and args.paths:
            model.free_dense_ffn()  # once, after the startup tasks: each re-read costs RSS
        models.append(model)
    return Replicas(models)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.kernel_cache < 0:
        parser.error(f"--kernel-cache {args.kernel_cache}: a number of kernels, 0 or more (0: keep none)")
    import torch
    import uvicorn

    from skeleton.export import ArtifactError, BackboneMismatchError

    if args.threads:
        torch.set_num_threads(args.threads)
    limit_kernel_cache(args.kernel_cache)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        replicas = build_replicas(args)
    except (ArtifactError, BackboneMismatchError, ValueError, FileNotFoundError) as err:
        print(f"skeleton-serve: error: {err}", file=sys.stderr)
        return 2
    config = ServeConfig(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_request_inputs=args.max_request_inputs,
        workers_per_device=args.workers_per_device,
    )
    app = create_app(replicas, config)
    tasks = ", ".join(sorted(replicas.first.tasks)) or "none yet"
    print(f"skeleton-serve: {tasks} on {args.devices} at http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
