"""Dynamic batching on asyncio: images from concurrent requests are gathered into one forward pass
(up to `max_batch` images, waiting at most `max_wait_s` after the first), which runs in one worker
thread so the event loop keeps accepting and answering requests while the model computes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

# (items of one batch) -> one result or exception per item, in order; runs in the worker thread
Process = Callable[[Sequence[Any]], Sequence[Any]]


@dataclass
class BatchStats:
    """How the batcher has grouped the work so far (GET /v1/stats)."""

    batches: int = 0  # forward passes run
    items: int = 0  # images classified
    largest: int = 0  # most images in one pass
    busy_s: float = 0.0  # seconds the worker spent in `process`

    def to_dict(self) -> dict[str, float]:
        return {"batches": self.batches, "images": self.items, "largest_batch": self.largest, "busy_s": round(self.busy_s, 6)}


@dataclass
class Job:
    items: list[Any]
    future: asyncio.Future[list[Any]]
    results: list[Any] = field(default_factory=list)


class Batcher:
    """`await batcher.submit(items)` -> one result per item (an exception instance where it failed)."""

    def __init__(self, process: Process, *, max_batch: int = 32, max_wait_s: float = 0.005) -> None:
        self.process = process
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self.stats = BatchStats()
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepfit-forward")
        self.task: asyncio.Task[None] | None = None
        self.carried: Job | None = None  # a job that did not fit the last batch: first in the next
        self.admitted = 0  # requests the server is handling now (see `admit`); 0 when nobody counts

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Count a request from its start (before its body is read) to its answer: when every
        request in the house is already in the batch, nobody can join it, so it runs at once
        instead of waiting out max_wait (a lone request then pays no batching delay)."""
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.loop(), name="deepfit-batcher")

    async def stop(self) -> None:
        """Cancel the loop (in-flight requests have been answered by then) and free the thread."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=True)

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        if not items:
            return []
        job = Job(list(items), asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def run_now(self, items: Sequence[Any]) -> list[Any]:
        """Run `items` through `process` in the worker thread, outside the queue (warm-up)."""
        return list(await asyncio.get_running_loop().run_in_executor(self.executor, self.process, list(items)))

    async def loop(self) -> None:
        while True:
            jobs = await self.gather()
            await self.run(jobs)

    async def gather(self) -> list[Job]:
        """The next batch: the first job waits as long as it must, later ones until the deadline."""
        first = self.carried if self.carried is not None else await self.queue.get()
        self.carried = None
        jobs, size = [first], len(first.items)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            if 0 < self.admitted <= len(jobs):
                break  # every request being handled is in this batch: no one to wait for
            job = self.next_ready()
            if job is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if size + len(job.items) > self.max_batch:
                self.carried = job  # never split a request: it leads the next batch
                break
            jobs.append(job)
            size += len(job.items)
        return jobs

    def next_ready(self) -> Job | None:
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def run(self, jobs: list[Job]) -> None:
        items = [item for job in jobs for item in job.items]
        started = time.perf_counter()
        try:
            results = list(await asyncio.get_running_loop().run_in_executor(self.executor, self.process, items))
        except Exception as err:  # a failure of the whole pass fails each of its requests, not the loop
            results = [err] * len(items)
        self.record(len(items), time.perf_counter() - started)
        offset = 0
        for job in jobs:
            part = results[offset : offset + len(job.items)]
            offset += len(job.items)
            if not job.future.done():  # the client may have gone away
                job.future.set_result(part)

    def record(self, size: int, seconds: float) -> None:
        self.stats.batches += 1
        self.stats.items += size
        self.stats.largest = max(self.stats.largest, size)
        self.stats.busy_s += seconds
