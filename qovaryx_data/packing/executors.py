"""Where a pack's work units run: an executor chosen by name, ``"local"`` or ``"ray"``.

An executor runs the tasks of `pool.unit_tasks` (work units, and decoded pieces of a large
.jsonl.zst) with the one unit function, `units.process_unit`, which writes each unit's part into
``<out>/.work``; it yields ``(key, unit, status, payload)`` for every task, in task order, exactly
as `pool.run_units` does ("done": finished by an earlier run, "ok": counts, "error": a
SourceError as data). The assembler (packer.py) reads the parts from ``.work`` in that order.
Since the parts, their order and the assembler are the same whatever runs the units, the output
is byte-identical for every executor and every number of workers, and resuming (finished parts
are skipped) works the same.

    local   `pool.run_units`: a process pool on this machine (the default)
    ray     `ray_executor.run_units`: Ray tasks on a Ray cluster (`pip install 'qovaryx[ray]'`)

A name, not a class, chooses the executor (configs stay serializable); the modules are imported
only when chosen, so the local pool never imports Ray.

    >>> ExecutorConfig("ray", ray_address="auto").name            # doctest: +SKIP
    'ray'
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

Executor = Literal["local", "ray"]

# name -> "module:function" (imported on use)
EXECUTORS: dict[str, str] = {
    "local": "qovaryx_data.packing.executors:run_local",
    "ray": "qovaryx_data.packing.ray_executor:run_units",
}


@dataclass(frozen=True)
class ExecutorConfig:
    """Which executor runs a pack's units, and how it reaches its workers."""
    name: str = "local"             # a key of EXECUTORS
    # ray only: "auto" (the cluster started on this machine by `ray start --head`), "HOST:PORT"
    # (a cluster's head); None: $RAY_ADDRESS, else a Ray instance started for this pack alone
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.name not in EXECUTORS:
            raise ValueError(f"executor {self.name!r} is not one of {sorted(EXECUTORS)}; use "
                             f"'local' (a process pool on this machine, the default) or 'ray'")
        if self.ray_address is not None and self.name != "ray":
            raise ValueError(f"ray_address={self.ray_address!r} is given with executor "
                             f"{self.name!r}; it only means something with executor='ray' "
                             f"(--executor ray)")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ValueError("ray_address is empty; give 'auto', HOST:PORT or leave it out")


RunUnits = Callable[..., Iterator[tuple]]


def get_executor(config: ExecutorConfig) -> RunUnits:
    """The executor's run function: ``run(units, settings, workers, piece_bytes, config)``;
    `workers` None means all the executor's cores (this machine's, or the Ray cluster's)."""
    module, func = EXECUTORS[config.name].split(":")
    mod = importlib.import_module(module)
    if hasattr(mod, "require"):
        mod.require()   # a missing optional dependency fails here, before any work
    return getattr(mod, func)


def run_local(units, settings, workers: int | None, piece_bytes: int,
              config: ExecutorConfig) -> Iterator[tuple]:
    """The local process pool (`pool.run_units`), `workers` processes (None: all usable cores)."""
    from qovaryx_data.packing.plan import usable_cores
    from qovaryx_data.packing.pool import run_units

    return run_units(units, settings, max(1, workers or usable_cores()), piece_bytes)
