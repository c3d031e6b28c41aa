"""Dynamic batching per task: requests for one task that arrive together run as one forward pass.

Each task has its own queue and collector, so a batch never mixes tasks and a slow or unknown task
cannot hold up another. A batch closes when it holds `max_batch_size` inputs or `max_wait_s` after its
first request; a request that would overflow it opens the next one. Forward passes run in a thread
pool with one slot per inference worker, so the event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


@dataclass
class _Pending:
    encoded: object
    size: int
    future: asyncio.Future


@dataclass
class BatchStats:
    """How full the batches of one task were: what the benchmark reports beside throughput."""

    batches: int = 0
    inputs: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, size: int) -> None:
        self.batches += 1
        self.inputs += size
        self.largest = max(self.largest, size)
        self.sizes[size] += 1

    def as_dict(self) -> dict:
        mean = self.inputs / self.batches if self.batches else 0.0
        return {"batches": self.batches, "inputs": self.inputs, "mean_batch": round(mean, 2),
                "largest_batch": self.largest}  # fmt: skip


class TaskBatcher:
    """Collects requests per task and runs each batch on a free worker.

    `run(worker, task, encoded_list)` does the forward pass and returns one result per request;
    `workers` are the objects handed to it (model replicas, repeated once per worker slot)."""

    def __init__(self, run, workers: list, *, max_batch_size: int, max_wait_s: float):
        self._run = run
        self._workers = list(workers)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queues: dict[str, asyncio.Queue] = {}
        self._carry: dict[str, _Pending | None] = {}
        self._collectors: dict[str, asyncio.Task] = {}
        self._free: asyncio.Queue | None = None
        self._pool = ThreadPoolExecutor(max_workers=len(self._workers), thread_name_prefix="infer")
        self.stats: dict[str, BatchStats] = defaultdict(BatchStats)

    async def submit(self, task: str, encoded, size: int):
        """Queue one request and wait for its result (an exception raised by `run` is re-raised)."""
        loop = asyncio.get_running_loop()
        if self._free is None:
            self._free = asyncio.Queue()
            for w in self._workers:
                self._free.put_nowait(w)
        if task not in self._queues:
            self._queues[task] = asyncio.Queue()
            self._carry[task] = None
            self._collectors[task] = loop.create_task(self._collect(task))
        future = loop.create_future()
        await self._queues[task].put(_Pending(encoded, size, future))
        return await future

    async def _next_batch(self, task: str) -> list[_Pending]:
        queue = self._queues[task]
        first = self._carry[task] or await queue.get()
        self._carry[task] = None
        batch, size = [first], first.size
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while size < self.max_batch_size:
            timeout = deadline - asyncio.get_running_loop().time()
            if timeout <= 0 and queue.empty():
                break
            try:
                item = queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(queue.get(), timeout)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if size + item.size > self.max_batch_size:
                self._carry[task] = item
                break
            batch.append(item)
            size += item.size
        return batch

    async def _collect(self, task: str) -> None:
        while True:
            batch = await self._next_batch(task)
            worker = await self._free.get()
            self._top_up(task, batch)  # what arrived while every worker was busy joins this batch
            asyncio.get_running_loop().create_task(self._execute(task, batch, worker))

    def _top_up(self, task: str, batch: list[_Pending]) -> None:
        queue, size = self._queues[task], sum(p.size for p in batch)
        while self._carry[task] is None and not queue.empty():
            item = queue.get_nowait()
            if size + item.size > self.max_batch_size:
                self._carry[task] = item
                return
            batch.append(item)
            size += item.size

    async def _execute(self, task: str, batch: list[_Pending], worker) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self._pool, self._run, worker, task, [p.encoded for p in batch]
            )
            self.stats[task].add(sum(p.size for p in batch))
            for pending, result in zip(batch, results):
                if not pending.future.done():
                    pending.future.set_result(result)
        except Exception as err:  # every request of the batch learns why (e.g. its task was removed)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(err)
        finally:
            self._free.put_nowait(worker)

    def close(self) -> None:
        for collector in self._collectors.values():
            collector.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
