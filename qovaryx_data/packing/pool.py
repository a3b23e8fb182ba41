"""The worker pool of a pack run: work units in, finished parts out, in unit order.

`run_units` yields each task (a work unit, or a decoded piece of a large .jsonl.zst) once its
part is on disk, in order, from a
`concurrent.futures.ProcessPoolExecutor` (or in process for one worker). A worker that dies stops
the pack with `PackWorkerError`; a `SourceError` raised in a worker reaches the caller whole.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator
from pathlib import Path

from qovaryx_data.errors import QovaryxDataError
from qovaryx_data.fileio import atomic_write
from qovaryx_data.packing.plan import PackSettings
from qovaryx_data.packing.units import init_worker, part_path, process_unit

# forkserver: workers fork from a clean server (no inherited locks, threads or tokenizer state)
MP_START = os.environ.get("QOVARYX_MP_START",
                          "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
IN_FLIGHT_PER_WORKER = 2   # tasks submitted ahead per worker: workers stay busy, memory bounded


def unit_tasks(units, settings: PackSettings, piece_bytes: int) -> Iterator[tuple]:
    """The pack's tasks in order: ``((k, None), unit)`` per work unit, and for a stream unit
    (a large .jsonl.zst) ``((k, j), piece)`` per decoded piece j (`readers.decoded_units`: the
    file is decoded here, once, in order). The unit is None when its part is already finished.

    A stream unit's piece count is recorded in ``unit-K.pieces`` once it is known; a resumed run
    whose pieces are all finished does not decode the file again."""
    from qovaryx_data.readers import decoded_units

    work = Path(settings.work_dir)
    for k, unit in enumerate(units):
        if not unit.stream:
            yield (k, None), (None if part_path(work, (k, None)).is_file() else unit)
            continue
        count = pieces_file(work, k)
        n = int(count.read_text()) if count.is_file() else -1
        if n >= 0 and all(part_path(work, (k, j)).is_file() for j in range(n)):
            for j in range(n):
                yield (k, j), None
            continue
        j = -1
        for j, piece in enumerate(decoded_units(unit, settings.source_configs[unit.source_index],
                                                piece_bytes)):
            yield (k, j), (None if part_path(work, (k, j)).is_file() else piece)
        atomic_write(count, f"{j + 1}\n")


def pieces_file(work: Path, k: int) -> Path:
    return work / f"unit-{k:06d}.pieces"


def run_units(units, settings: PackSettings, workers: int, piece_bytes: int):
    """Yield ``(key, unit, status, payload)`` for every task of `unit_tasks`, in order: status
    "done" (its part was finished by an earlier run; unit None), "ok" (payload: counts) or
    "error" (payload: the SourceError as data, `rebuild_error`). Stops the pool when closed."""
    work = Path(settings.work_dir)
    pending = sum(1 for k, u in enumerate(units)
                  if u.stream or not part_path(work, (k, None)).is_file())
    tasks = unit_tasks(units, settings, piece_bytes)
    if workers <= 1 or pending <= 1 and not any(u.stream for u in units):
        init_worker(settings, in_process=True)
        for key, unit in tasks:
            if unit is None:
                yield key, None, "done", {}
            else:
                yield (key, unit, *process_unit((key, unit)))
        return
    yield from _pool_results(tasks, settings, workers if any(u.stream for u in units)
                             else min(workers, pending))


def _pool_results(tasks: Iterator[tuple], settings: PackSettings, n: int):
    """run_units over a pool of `n` processes. At most IN_FLIGHT_PER_WORKER tasks per worker
    are submitted ahead of the one being waited for (finished tasks pass through in order).

    concurrent.futures notices a worker that dies (killed, out of memory): every unfinished task
    then fails with BrokenProcessPool, turned here into PackWorkerError."""
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context(MP_START)
    if MP_START == "forkserver":
        ctx.set_forkserver_preload(["qovaryx_data.packing.units"])
    pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=init_worker, initargs=(settings,))
    queue: deque = deque()        # (key, unit, future or None) in task order
    in_flight = 0
    tasks = iter(tasks)

    def fill() -> None:
        nonlocal in_flight
        while in_flight < IN_FLIGHT_PER_WORKER * n and len(queue) < 64 * n:
            task = next(tasks, None)
            if task is None:
                return
            key, unit = task
            fut = None if unit is None else pool.submit(process_unit, (key, unit))
            in_flight += fut is not None
            queue.append((key, unit, fut))

    finished = False
    key, unit = (0, None), None
    try:
        fill()
        while queue:
            key, unit, fut = queue.popleft()
            if fut is None:
                yield key, None, "done", {}
            else:
                in_flight -= 1
                fill()
                yield (key, unit, *fut.result())
            fill()
        finished = True
    except BrokenProcessPool:   # raised by result() or submit() once a worker has died
        raise _worker_died(pool, unit, key, Path(settings.work_dir)) from None
    finally:
        _stop_pool(pool, graceful=finished)


class PackWorkerError(QovaryxDataError):
    """A worker process of the pack died (killed by a signal, out of memory, a crash)."""


def _worker_died(pool, unit, key: tuple, work: Path) -> PackWorkerError:
    import signal

    codes = {p.exitcode for p in (pool._processes or {}).values()   # noqa: SLF001
             if p.exitcode not in (None, 0)}
    if len(codes) > 1:   # the pool SIGTERMs the survivors once one worker died: not the cause
        codes.discard(-signal.SIGTERM)
    how = ", ".join(f"killed by {signal.Signals(-c).name}" if c < 0 and -c in signal.valid_signals()
                    else f"exit status {c}" for c in sorted(codes)) or "it exited unexpectedly"
    k, j = key
    due = "" if unit is None else f", {unit.path} [{unit.start}, {unit.end})"
    due += "" if j is None else f", decoded piece {j}"
    return PackWorkerError(
        f"a pack worker process died ({how}) with units still being tokenized (the next one "
        f"due: unit {k}{due}); the pack stopped. A worker "
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


def rebuild_error(payload: dict) -> Exception:
    """Worker exceptions travel as plain data (keyword-only attributes do not pickle)."""
    import importlib

    cls = getattr(importlib.import_module(payload["module"]), payload["cls"])
    return cls(payload["message"], path=payload["path"], row=payload["row"],
               reason=payload["reason"])
