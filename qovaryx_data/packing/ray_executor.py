"""The Ray executor of a pack: the same unit function as the local pool, run as Ray tasks.

The driver (the process that calls `pack`) plans the units, submits one Ray task per unit that is
not finished yet (at most ``IN_FLIGHT_PER_WORKER * workers`` ahead of the one the assembler waits
for), and takes their results in unit order; each task runs `units.process_unit`, which reads its
byte range of the input and writes the unit's part into ``<out>/.work``, as a local pool worker
does. The driver then assembles the parts exactly as after a local run, so the output is
byte-identical to a local pack, for any number of Ray workers.

Where the bytes go (docs/FORMAT.md, "Packing on a Ray cluster"):

* driver -> task, through Ray's object store: the PackSettings once (`ray.put`), then a unit
  descriptor per task (a path and a byte range, ~200 bytes). Only the decoded pieces of a large
  .jsonl.zst carry text (~unit_bytes each): the driver decodes the stream, as it does locally.
* task -> storage: the part files. Inputs, the tokenizer and ``<out>`` must be at the same
  absolute paths on every node (a shared filesystem); a task that cannot see ``<out>/.work``
  stops the pack with an error that says so.
* task -> driver: a few counts per unit. The driver's memory is O(units), never O(tokens).

Parts go to storage rather than through the object store so that a killed driver keeps them:
the next run resumes from the finished parts, as a local pack does. A task whose worker dies (a
signal, the out-of-memory killer, a lost node) is retried by Ray (``max_retries``); a part is
written atomically and deterministically, so a retried or repeated task writes the same bytes.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from qovaryx_data.errors import QovaryxDataError
from qovaryx_data.packing.executors import ExecutorConfig
from qovaryx_data.packing.plan import PackSettings, usable_cores
from qovaryx_data.packing.pool import IN_FLIGHT_PER_WORKER, PackWorkerError, unit_tasks

RAY_EXTRA = "pip install 'qovaryx[ray]'"
MAX_RETRIES = 3                # Ray re-runs a task whose worker died this many times
WORK_STAMP = "fingerprint"     # plan.prepare_work_dir writes it first: a task checks it is visible


def require():
    """Import Ray, or raise a QovaryxDataError that names the extra to install."""
    try:
        import ray
    except ImportError as e:
        raise QovaryxDataError(
            f"--executor ray (pack(executor='ray')) needs Ray, which is not installed here "
            f"({e}); install the extra: {RAY_EXTRA}, or leave out --executor ray to pack with "
            f"the local process pool") from None
    return ray


_INITIALIZED: dict = {}        # in a Ray worker process: the settings its tokenizer was loaded for


def pack_unit_task(settings: PackSettings, key: tuple, unit) -> tuple[str, dict]:
    """One Ray task: the local pool's worker initializer (once per worker process and pack) and
    unit function, unchanged."""
    from qovaryx_data.packing.units import init_worker, process_unit

    if _INITIALIZED.get("settings") != settings:
        if not (Path(settings.work_dir) / WORK_STAMP).is_file():
            import socket

            raise QovaryxDataError(
                f"node {socket.gethostname()}: the pack's work folder {settings.work_dir} is not "
                f"visible on this Ray node; with Ray on several machines, --out (and the inputs "
                f"and tokenizer) must be on storage that every node mounts at the same path")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one task per CPU already
        init_worker(settings, in_process=True)   # in_process: Ray owns its worker processes
        _INITIALIZED["settings"] = settings
    return process_unit((key, unit))


def run_units(units, settings: PackSettings, workers: int | None, piece_bytes: int,
              config: ExecutorConfig) -> Iterator[tuple]:
    """`pool.run_units` on Ray: ``(key, unit, status, payload)`` for every task, in order.

    Uses the Ray instance this process is already connected to (`ray.init` by the caller), else
    connects to `config.ray_address` (or $RAY_ADDRESS), else starts a local instance with
    `workers` CPUs for this pack and stops it at the end. `workers` None: all the cluster's CPUs."""
    ray = require()
    workers = max(1, workers) if workers else None
    started = _connect(ray, config.ray_address, workers)
    queue: deque = deque()            # (key, unit, ObjectRef or None) in task order
    finished = False
    try:
        n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES,
                          retry_exceptions=False)(pack_unit_task)   # a bad row is not transient
        settings_ref = ray.put(settings)
        tasks = iter(unit_tasks(units, settings, piece_bytes))
        in_flight = 0

        def fill() -> None:
            nonlocal in_flight
            while in_flight < IN_FLIGHT_PER_WORKER * n and len(queue) < 64 * n:
                t = next(tasks, None)
                if t is None:
                    return
                key, unit = t
                ref = None if unit is None else task.remote(settings_ref, key, unit)
                in_flight += ref is not None
                queue.append((key, unit, ref))

        fill()
        while queue:
            key, unit, ref = queue.popleft()
            if ref is None:
                yield key, None, "done", {}
            else:
                in_flight -= 1
                fill()
                try:
                    status, payload = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise _task_failed(ray, e, key, unit, Path(settings.work_dir)) from None
                yield key, unit, status, payload
            fill()
        finished = True
    finally:
        if not finished:   # an error or an interrupt: stop what is still queued or running
            for _, _, ref in queue:
                if ref is not None:
                    try:
                        ray.cancel(ref)
                    except Exception:  # noqa: BLE001 - best effort; the cluster may be gone
                        pass
        if started:
            ray.shutdown()


def _connect(ray, address: str | None, workers: int | None) -> bool:
    """Connect to Ray; True when this call started the connection (and must shut it down)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = dict(logging_level=logging.WARNING, include_dashboard=False)
    if address is None:
        ray.init(num_cpus=workers or usable_cores(), **quiet)
        return True
    try:
        check_reachable(address)
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise QovaryxDataError(
            f"--ray-address {address}: could not connect to a Ray cluster ({e}); start one "
            f"with `ray start --head` (then --ray-address auto), give its head's HOST:PORT, or "
            f"leave --ray-address and $RAY_ADDRESS unset to start a Ray instance on this "
            f"machine for this pack") from None
    return True


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT that accepts no TCP connection raises ConnectionError at once: `ray.init`
    itself keeps retrying such an address for minutes. ("auto" and ray:// are Ray's to resolve.)"""
    import socket

    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"nothing accepts connections at {address}: {e}") from None


def _task_failed(ray, e, key: tuple, unit, work: Path) -> Exception:
    """A task that failed for good: its own QovaryxDataError as it was raised; anything else
    (its worker died more than MAX_RETRIES times, a node was lost, a bug) as PackWorkerError."""
    cause = getattr(e, "cause", None)
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, QovaryxDataError):
        return cause
    k, j = key
    due = "" if unit is None else f" ({unit.path} [{unit.start}, {unit.end})"
    due += ")" if j is None else f", decoded piece {j})"
    if isinstance(e, ray.exceptions.RayTaskError):
        what = f"raised {type(cause).__name__ if cause else 'an error'}:\n{e}"
    else:
        what = (f"failed {MAX_RETRIES + 1} times ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'})")
    return PackWorkerError(
        f"a Ray task of the pack, unit {k}{due}, {what}; the pack stopped. Finished units are "
        f"kept in {work}: re-run the same pack to resume from them")
