"""Torch work off the batching loop runs in threads that end with it (engine/threads.py).

The property the server relies on is libgomp's: a thread that ran a parallel region keeps
an OpenMP pool of worker threads while it lives, and two live pools slow every CPU matmul
down. The pool tests count the process's OS threads with real torch.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import CancelledError

import pytest

from mlflow_tfx_plugin.deployments.engine.threads import (
    PassingThreadExecutor,
    in_passing_thread,
    run_in_passing_thread,
)


def test_each_task_runs_in_a_new_thread_that_has_ended_by_its_result():
    executor = PassingThreadExecutor(max_workers=1)
    threads = [executor.submit(threading.current_thread).result(timeout=10) for _ in range(3)]

    assert len({id(thread) for thread in threads}) == 3
    assert threading.main_thread() not in threads
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_at_most_max_workers_tasks_run_at_once():
    executor = PassingThreadExecutor(max_workers=2)
    running, peak, lock = 0, 0, threading.Lock()

    def task() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1

    futures = [executor.submit(task) for _ in range(6)]
    for future in futures:
        future.result(timeout=10)
    assert peak == 2


def test_an_error_reaches_the_caller():
    def fail() -> None:
        raise ValueError("bad weights")

    with pytest.raises(ValueError, match="bad weights"):
        run_in_passing_thread(fail)


def test_shutdown_refuses_new_tasks_and_cancels_waiting_ones():
    executor = PassingThreadExecutor(max_workers=1)
    release = threading.Event()
    running = executor.submit(release.wait, 10)
    waiting = executor.submit(lambda: "never")
    time.sleep(0.05)

    executor.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(lambda: None)
    release.set()

    assert running.result(timeout=10) is True
    with pytest.raises(CancelledError):
        waiting.result(timeout=10)


def test_max_workers_must_be_positive():
    with pytest.raises(ValueError, match="max_workers"):
        PassingThreadExecutor(max_workers=0)


def test_awaitable_from_an_event_loop():
    async def main() -> tuple[str, threading.Thread]:
        return await in_passing_thread(lambda: ("done", threading.current_thread()))

    result, thread = asyncio.run(main())
    assert result == "done"
    assert thread is not threading.main_thread()


_POOL_COUNTS = textwrap.dedent(
    """
    import json, os, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    import torch
    from mlflow_tfx_plugin.deployments.engine.threads import PassingThreadExecutor

    def threads() -> int:
        time.sleep(0.2)  # a thread that set its future's result may not have exited yet
        return len(os.listdir("/proc/self/task"))

    def matmul() -> None:
        a = torch.randn(256, 256)
        for _ in range(20):
            a @ a

    counts = {"start": threads()}
    PassingThreadExecutor().submit(matmul).result()
    counts["after passing thread"] = threads()
    pool = ThreadPoolExecutor(max_workers=1)
    pool.submit(matmul).result()
    counts["after pool thread"] = threads()
    print(json.dumps(counts))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/task")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: torch starts no OpenMP pool")
def test_a_passing_thread_takes_its_openmp_pool_along():
    """A control run keeps a ThreadPoolExecutor worker alive: its pool's threads stay."""
    proc = subprocess.run(
        [sys.executable, "-c", _POOL_COUNTS], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout.strip().splitlines()[-1])

    assert counts["after passing thread"] == counts["start"]
    # the pool's worker thread, plus at least one OpenMP worker it started
    assert counts["after pool thread"] >= counts["start"] + 2
