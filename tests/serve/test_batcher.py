"""The dynamic batcher in-process: concurrent submissions share passes of at most max_batch items,
a request is never split, each gets its own results, and a failing pass fails only its requests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from deepfit.serve.batcher import Batcher


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_concurrent_jobs_are_grouped_up_to_max_batch_without_splitting() -> None:
    seen: list[list[int]] = []
    threads: set[str] = set()

    def process(items: Sequence[int]) -> list[int]:
        seen.append(list(items))
        threads.add(threading.current_thread().name)
        return [item * 10 for item in items]

    async def scenario() -> list[list[int]]:
        batcher = Batcher(process, max_batch=8, max_wait_s=0.05)
        batcher.start()
        jobs = [[j * 100 + i for i in range(size)] for j, size in enumerate([3, 3, 3, 1, 5, 2, 8, 1])]
        results = await asyncio.gather(*(batcher.submit(job) for job in jobs))
        await batcher.stop()
        assert batcher.stats.items == 26 and batcher.stats.batches == len(seen)
        return [list(r) for r in results]

    results = run(scenario())
    jobs = [[j * 100 + i for i in range(size)] for j, size in enumerate([3, 3, 3, 1, 5, 2, 8, 1])]
    assert results == [[item * 10 for item in job] for job in jobs]
    assert all(len(batch) <= 8 for batch in seen) and len(seen) < len(jobs)
    for job in jobs:  # each job's items sit together, in order, in exactly one batch
        (batch,) = [b for b in seen if job[0] in b]
        start = batch.index(job[0])
        assert batch[start : start + len(job)] == job
    assert threads == {"deepfit-forward_0"}  # off the event loop's thread


def test_a_failing_pass_fails_its_requests_and_the_loop_goes_on() -> None:
    def process(items: Sequence[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("boom")
        return list(items)

    async def scenario() -> tuple[list[Any], list[Any]]:
        batcher = Batcher(process, max_batch=4, max_wait_s=0.0)
        batcher.start()
        failed = await batcher.submit([13])
        fine = await batcher.submit([1, 2])
        await batcher.stop()
        return failed, fine

    failed, fine = run(scenario())
    assert isinstance(failed[0], RuntimeError) and fine == [1, 2]


def test_a_batch_holding_every_admitted_request_runs_without_waiting() -> None:
    seen: list[list[int]] = []

    def process(items: Sequence[int]) -> list[int]:
        seen.append(list(items))
        return list(items)

    async def scenario() -> list[Any]:
        batcher = Batcher(process, max_batch=64, max_wait_s=3600.0)  # waiting out max_wait would hang the test
        batcher.start()

        async def request(items: list[int]) -> list[Any]:
            with batcher.admit():
                await asyncio.sleep(0)
                return await batcher.submit(items)

        results = await asyncio.wait_for(asyncio.gather(request([1]), request([2, 3])), timeout=60)
        assert batcher.admitted == 0
        await batcher.stop()
        return results

    assert run(scenario()) == [[1], [2, 3]]
    assert sorted(item for batch in seen for item in batch) == [1, 2, 3]
