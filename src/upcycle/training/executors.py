"""Run independent jobs (one per expert) in this process, in local worker processes, or on a Ray cluster.

A job is a picklable module-level function and its arguments; it must be idempotent (skip work that is already
on disk), which is what makes every executor resumable: kill the run, start it again, finished jobs return at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from upcycle.errors import UserError

log = logging.getLogger(__name__)
EXECUTORS = ("local", "process", "ray")


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], *, executor: str = "local", workers: int = 1,
             address: str | None = None, description: str = "jobs") -> list[Any]:
    """Call `fn(*job)` for every job and return the results in job order.

    local: one after another in this process (each job may show its own progress bar).
    process: `workers` spawned processes on this machine, torch threads split between them.
    ray: one Ray task per job on the cluster at `address` (None starts a local Ray), one CPU each.
    """
    check_executor(executor, workers)
    if not jobs:
        return []
    if executor == "local":
        return _run_local(fn, jobs, description)
    if executor == "process":
        return _run_processes(fn, jobs, workers, description)
    return _run_ray(fn, jobs, address, description)


def check_executor(executor: str, workers: int) -> None:
    """Refuse an unknown executor or a worker count below one (callers check before they change anything)."""
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor}: choose one of {', '.join(EXECUTORS)}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")


def _progress():
    if os.environ.get("UPCYCLE_NO_PROGRESS"):
        return None
    from upcycle.progress import make_progress

    return make_progress()


def _run_local(fn, jobs, description):
    progress = _progress()
    results = []
    if progress is None:
        return [fn(*job) for job in jobs]
    with progress:
        overall = progress.add_task(description, total=len(jobs))
        for job in jobs:
            results.append(fn(*job, progress=progress))
            progress.advance(overall)
    return results


def _init_worker(threads: int) -> None:
    import warnings

    import torch

    torch.set_num_threads(threads)
    os.environ["UPCYCLE_NO_PROGRESS"] = "1"  # only the parent draws bars
    # as in the CLI's own process: deprecation notices from inside transformers/peft are not for our users
    warnings.filterwarnings("ignore", category=FutureWarning)


def _run_processes(fn, jobs, workers, description):
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // workers)
    results: list[Any] = [None] * len(jobs)
    progress = _progress()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        task = progress.add_task(description, total=len(jobs)) if progress else None
        if progress:
            progress.start()
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if progress:
                    progress.advance(task)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        finally:
            if progress:
                progress.stop()
    return results


def _run_ray(fn, jobs, address, description):
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'upcycle[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"UPCYCLE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}})
    remote = ray.remote(num_cpus=1)(fn)
    refs = [remote.remote(*job) for job in jobs]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(jobs)
    progress = _progress()
    task = progress.add_task(f"{description} (ray)", total=len(jobs)) if progress else None
    if progress:
        progress.start()
    try:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results[index[done[0]]] = ray.get(done[0])
            if progress:
                progress.advance(task)
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    finally:
        if progress:
            progress.stop()
    return results
