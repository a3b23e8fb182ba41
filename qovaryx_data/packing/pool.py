"""The worker pool of a pack run: work units in, finished parts out, in unit order.

`run_units` yields each unit's index once its part is on disk, in unit order, from a
`concurrent.futures.ProcessPoolExecutor` (or in process for one worker). A worker that dies stops
the pack with `PackWorkerError`; a `SourceError` raised in a worker reaches the caller whole.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

from qovaryx_data.errors import QovaryxDataError
from qovaryx_data.packing.plan import PackSettings
from qovaryx_data.packing.units import init_worker, part_path, process_unit

# forkserver: workers fork from a clean server (no inherited locks, threads or tokenizer state)
# forkserver: workers fork from a clean server (no inherited locks, threads or tokenizer state)
MP_START = os.environ.get("QOVARYX_MP_START",
                          "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")


def run_units(units, settings: PackSettings, workers: int):
    """Yield (unit index, stats) in unit order; units with a finished part are not redone."""
    work = Path(settings.work_dir)
    pending = [k for k in range(len(units)) if not part_path(work, k).is_file()]
    if workers <= 1 or len(pending) <= 1:
        init_worker(settings, in_process=True)
        results = ((k, process_unit((k, units[k]))) for k in pending)
    else:
        results = _pool_results(units, pending, settings, workers)
    try:
        todo = set(pending)
        for k in range(len(units)):
            if k in todo:
                k_ran, (status, payload) = next(results)
                assert k_ran == k, (k_ran, k)
                if status == "error":
                    raise _rebuild_error(payload)
                yield k, {"ran": True, **payload}
            else:
                yield k, {"ran": False}
    finally:
        results.close()   # stops the pool (and its workers) when the run ends early


IN_FLIGHT_PER_WORKER = 2   # units submitted ahead per worker: workers stay busy, memory bounded


def _pool_results(units, pending: list[int], settings: PackSettings, workers: int):
    """Yield (k, process_unit result) for the `pending` units in order, from a process pool.

    concurrent.futures notices a worker that dies (killed, out of memory): every unfinished unit
    then fails with BrokenProcessPool, turned here into PackWorkerError. At most
    IN_FLIGHT_PER_WORKER units per worker are submitted ahead of the one being waited for."""
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context(MP_START)
    if MP_START == "forkserver":
        ctx.set_forkserver_preload(["qovaryx_data.packing.units"])
    n = min(workers, len(pending))
    pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=init_worker, initargs=(settings,))
    todo = iter(pending)
    in_flight: deque = deque()

    def submit() -> None:
        k = next(todo, None)
        if k is not None:
            in_flight.append((k, pool.submit(process_unit, (k, units[k]))))

    finished = False
    k = pending[0]
    try:
        for _ in range(IN_FLIGHT_PER_WORKER * n):
            submit()
        while in_flight:
            k, fut = in_flight.popleft()
            submit()
            result = fut.result()
            yield k, result
        finished = True
    except BrokenProcessPool:   # raised by result() or submit() once a worker has died
        raise _worker_died(pool, units[k], k, Path(settings.work_dir)) from None
    finally:
        _stop_pool(pool, graceful=finished)


class PackWorkerError(QovaryxDataError):
    """A worker process of the pack died (killed by a signal, out of memory, a crash)."""


def _worker_died(pool, unit, k: int, work: Path) -> PackWorkerError:
    import signal

    codes = {p.exitcode for p in (pool._processes or {}).values()   # noqa: SLF001
             if p.exitcode not in (None, 0)}
    if len(codes) > 1:   # the pool SIGTERMs the survivors once one worker died: not the cause
        codes.discard(-signal.SIGTERM)
    how = ", ".join(f"killed by {signal.Signals(-c).name}" if c < 0 and -c in signal.valid_signals()
                    else f"exit status {c}" for c in sorted(codes)) or "it exited unexpectedly"
    return PackWorkerError(
        f"a pack worker process died ({how}) with units still being tokenized (the next one "
        f"due: unit {k}, {unit.path} [{unit.start}, {unit.end})); the pack stopped. A worker "
        f"killed by SIGKILL is often the out-of-memory killer: lower --workers, or give the "
        f"machine more memory. Finished units are kept in {work}: re-run the same pack to resume "
        f"from them")


def _stop_pool(pool, graceful: bool) -> None:
    """Shut the pool down; after an error or an interrupt, kill its workers instead of waiting
    for their units to finish."""
    procs = list((pool._processes or {}).values())   # noqa: SLF001 - no public handle in 3.11
    manager = pool._executor_manager_thread          # noqa: SLF001 - shutdown() forgets it
    if graceful:
        pool.shutdown(wait=True)
        return
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join()
    # Wait for the pool's manager thread too: it closes its wake-up pipe on the way out, and
    # CPython 3.11's exit hook (concurrent.futures.process._python_exit) writes to that pipe
    # without a lock. Left running, the two race, and the CLI's clear error is followed by a
    # "Bad file descriptor" traceback at exit.
    if manager is not None:
        manager.join(timeout=60)


def _rebuild_error(payload: dict) -> Exception:
    """Worker exceptions travel as plain data (keyword-only attributes do not pickle)."""
    import importlib

    cls = getattr(importlib.import_module(payload["module"]), payload["cls"])
    return cls(payload["message"], path=payload["path"], row=payload["row"],
               reason=payload["reason"])
