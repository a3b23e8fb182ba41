"""A pack worker killed for real (SIGKILL, as the out-of-memory killer does) stops `pack` with a
clear error, within a bounded time, leaving no process behind (review finding 6: with
multiprocessing.Pool a lost unit was never returned and the pack hung forever)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import yaml

HANG_LIMIT_S = 90     # far above the seconds the error takes; reaching it means the pack hung


def _pool_workers(parent: psutil.Process) -> list[psutil.Process]:
    """The pool's worker processes: grandchildren (forkserver) or children that are not helpers."""
    found = []
    for c in parent.children(recursive=True):
        try:
            cmd = " ".join(c.cmdline())
            if c.ppid() != parent.pid or ("forkserver" not in cmd and "resource_tracker" not in cmd):
                found.append(c)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_killed_worker_stops_the_pack_with_a_clear_error(tmp_path, kjv_path, small_tokenizer):
    m = {"name": "killw", "tokenizer": str(small_tokenizer), "output": "out", "unit_bytes": 1024,
         "sources": [{"path": str(kjv_path), "format": "text", "split": "line"}]}  # ~4,300 units
    manifest = tmp_path / "pack.yaml"
    manifest.write_text(yaml.safe_dump(m), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "qovaryx_data.cli", "pack", "--manifest",
                             str(manifest), "--workers", "2", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + HANG_LIMIT_S
        workers: list[psutil.Process] = []
        work = tmp_path / "out" / ".work"
        while len(workers) < 2 or not any(work.glob("unit-*.npz")):   # mid-run: units in flight
            assert proc.poll() is None, f"pack ended before its workers were seen: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no pool workers appeared"
            time.sleep(0.05)
            workers = _pool_workers(parent)
        everyone = parent.children(recursive=True)
        os.kill(workers[0].pid, signal.SIGKILL)
        try:
            os.kill(workers[1].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the pack already stopped it: the first death breaks the pool, which ends the rest
        try:
            _, err = proc.communicate(timeout=HANG_LIMIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pack still running {HANG_LIMIT_S} s after its workers were "
                                 f"killed: it hangs on the lost units") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2, err
    assert "error: a pack worker process died (killed by SIGKILL)" in err, err
    assert kjv_path.name in err and "lower --workers" in err and "re-run the same pack to resume" in err
    assert "Traceback" not in err, err
    _, alive = psutil.wait_procs(everyone, timeout=30)   # workers and helpers die with the pack
    assert not alive, [(p.pid, p.name()) for p in alive]
    assert not (tmp_path / "out" / "dataset.json").exists()
