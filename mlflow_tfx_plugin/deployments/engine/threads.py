"""Where torch work may run on CPU: threads that end with their task, beside one long-lived loop.

torch's CPU kernels run on OpenMP (libgomp), which keeps one pool of worker threads for
every thread that has run a parallel region, for as long as that thread lives. Once two
pools exist and their threads outnumber the CPUs, libgomp stops letting idle workers spin
between parallel regions, so every small matrix product waits for a sleeping worker to
wake: a decoding step on 2 cores took 52 ms instead of 31 ms (SmolLM2-135M, float32).

So the continuous-batching loop is the one long-lived thread that runs torch, and every
other piece of torch work (loading and warming up the model, a fallback ``generate``, a
pyfunc ``predict``) runs in a thread of its own that ends with it, taking its pool along.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")


class PassingThreadExecutor(Executor):
    """An executor that runs each task in a new thread, which ends when the task does.

    At most ``max_workers`` tasks run at once; the others wait (their threads hold no
    OpenMP pool until they run torch code).
    """

    def __init__(self, max_workers: int = 1, *, thread_name_prefix: str = "tfx-torch") -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self._slots = threading.BoundedSemaphore(max_workers)
        self._prefix = thread_name_prefix
        self._threads: dict[threading.Thread, Future[Any]] = {}
        self._lock = threading.Lock()  # guards the two below and _threads
        self._shutdown = False
        self._started = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new tasks after shutdown")
            self._started += 1
            thread = threading.Thread(
                target=self._run,
                args=(future, fn, args, kwargs),
                name=f"{self._prefix}-{self._started}",
                daemon=True,
            )
            self._threads[thread] = future
        thread.start()
        return future

    def _run(self, future: Future[Any], fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        try:
            with self._slots:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as err:  # handed to whoever awaits the future
                        future.set_exception(err)
        finally:
            with self._lock:
                self._threads.pop(threading.current_thread(), None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            threads = list(self._threads.items())
        if cancel_futures:
            for _, future in threads:
                future.cancel()  # only tasks still waiting for a slot; running ones finish
        if wait:
            for thread, _ in threads:
                thread.join()


def run_in_passing_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a new thread that ends with it; its result or error."""
    executor = PassingThreadExecutor(thread_name_prefix=getattr(fn, "__name__", "tfx-torch"))
    return executor.submit(fn, *args, **kwargs).result()


async def in_passing_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Await ``fn(*args, **kwargs)`` run in a new thread that ends with it."""
    executor = PassingThreadExecutor(thread_name_prefix=getattr(fn, "__name__", "tfx-torch"))
    return await asyncio.wrap_future(executor.submit(fn, *args, **kwargs))
