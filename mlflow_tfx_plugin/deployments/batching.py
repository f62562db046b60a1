"""Dynamic micro-batching: items submitted concurrently run together on one worker thread.

Nothing here knows about models: the generation engine batches prompts with it, and the
server batches embedding inputs with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, Protocol, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

BATCH_WINDOW_S = 0.005
"""How long a batch waits for more items once its first one arrives."""


class BatchObserver(Protocol):
    """Called with the size of every batch that runs (the server's metrics)."""

    def __call__(self, size: int) -> None: ...


class MicroBatcher(Generic[ItemT, ResultT]):
    """Collects items submitted concurrently and runs them in batches on one worker thread.

    Args:
        run_batch: turns a list of items into a list of results (same order). It runs on
            the worker thread; a result that is an exception fails its item only, an
            exception raised fails every item of that batch.
        max_batch_size: most items per batch.
        window_s: how long to wait for more items once the first one arrives.
    """

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], Sequence[ResultT | Exception]],
        *,
        max_batch_size: int,
        executor: Executor,
        window_s: float = BATCH_WINDOW_S,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._executor = executor
        self._window_s = window_s
        self._on_batch = on_batch or (lambda size: None)
        self._pending: asyncio.Queue[tuple[ItemT, asyncio.Future[ResultT]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queue_depth(self) -> int:
        return self._pending.qsize() if self._pending else 0

    async def submit(self, item: ItemT) -> ResultT:
        """Queue ``item`` and wait for its result."""
        loop = asyncio.get_running_loop()
        if self._pending is None or self._loop is not loop:  # first use, or a new event loop
            self._loop = loop
            self._pending = asyncio.Queue()
            self._worker = asyncio.create_task(self._work())
        future: asyncio.Future[ResultT] = loop.create_future()
        await self._pending.put((item, future))
        return await future

    async def _work(self) -> None:
        assert self._pending is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._pending.get()]
            deadline = loop.time() + self._window_s
            while len(batch) < self._max_batch_size:
                try:
                    timeout = max(deadline - loop.time(), 0)
                    batch.append(await asyncio.wait_for(self._pending.get(), timeout))
                except TimeoutError:
                    break
            live = [(item, future) for item, future in batch if not future.done()]
            if live:
                await self._run(loop, live)

    async def _run(
        self, loop: asyncio.AbstractEventLoop, batch: list[tuple[ItemT, asyncio.Future[ResultT]]]
    ) -> None:
        self._on_batch(len(batch))
        try:
            results = await loop.run_in_executor(
                self._executor, self._run_batch, [item for item, _ in batch]
            )
            if len(results) != len(batch):  # checked here: a zip error would end the worker
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
        except Exception as err:  # every caller of this batch gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
