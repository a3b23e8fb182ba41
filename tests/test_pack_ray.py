"""`pack --executor ray`: the same units as Ray tasks, output byte-identical to a local pack.

One local Ray instance for the module (`ray.init(num_cpus=2)`, loopback only, no dashboard, no
usage stats), started by the first test that needs it and stopped at the end. Corpus: 12 plays
(one document each), ~1.5 MB of KJV verses (one a line) and ~0.8 MB more as a `.jsonl.zst`
stream unit (decoded by the driver, its pieces sent to the tasks), 32 KiB work units, a
validation split: a real task is killed mid-run (Ray retries it), and a driver is killed mid-run
and resumed.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from qovaryx_data.errors import QovaryxDataError
from qovaryx_data.packer import pack
from qovaryx_data.packing.executors import ExecutorConfig

# Before Ray is imported: bind to 127.0.0.1 only (Ray's switch for a single-machine instance),
# no usage statistics, no auth token written to ~/.ray. Subprocess drivers inherit these.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TASK_TITLE = "ray::pack_unit_task"     # the process title of a Ray worker running a unit


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".pack.lock"}


def _import_ray():
    if os.environ.get("CI"):       # CI installs the dev extra, which has Ray: never skip there
        import ray

        return ray
    return pytest.importorskip("ray")


# ------------------------------------------------------------------ without a Ray instance


def test_without_ray_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)      # `import ray` raises ImportError
    with pytest.raises(QovaryxDataError, match=r"pip install 'qovaryx\[ray\]'"):
        pack(tmp_path / "missing.yaml", executor="ray")   # before the manifest is even read
    from qovaryx_data.cli import main

    r = CliRunner().invoke(main, ["pack", "--manifest", __file__, "--executor", "ray"])
    assert r.exit_code == 2 and "pip install 'qovaryx[ray]'" in r.output, r.output
    assert "Traceback" not in r.output


def test_executor_choice_is_checked(tmp_path):
    with pytest.raises(ValueError, match="not one of"):
        ExecutorConfig("dask")
    with pytest.raises(ValueError, match="only means something with executor='ray'"):
        ExecutorConfig("local", ray_address="auto")
    from qovaryx_data.cli import main

    r = CliRunner().invoke(main, ["pack", "--manifest", __file__, "--ray-address", "auto"])
    assert r.exit_code == 2 and "--ray-address needs --executor ray" in r.output, r.output


def test_an_unreachable_ray_address_fails_fast():
    from qovaryx_data.packing.ray_executor import check_reachable

    with pytest.raises(ConnectionError, match="nothing accepts connections at 127.0.0.1:1"):
        check_reachable("127.0.0.1:1")       # ray.init would retry it for minutes
    with pytest.raises(ValueError, match="not HOST:PORT"):
        check_reachable("localhost")
    check_reachable("auto")                  # Ray resolves it


# ------------------------------------------------------------------ one Ray instance


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    ray = _import_ray()
    ctx = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 << 20,
                   logging_level=logging.WARNING,
                   _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, shakespeare_files, kjv_path, small_tokenizer) -> Path:
    import zstandard

    d = tmp_path_factory.mktemp("raypack")
    verses = kjv_path.read_text(encoding="utf-8").splitlines(keepends=True)
    head, tail, size = [], [], 0
    for v in verses:
        (head if size < 1_500_000 else tail).append(v)
        size += len(v.encode())
        if size > 2_300_000:
            break
    (d / "verses.txt").write_text("".join(head), encoding="utf-8")
    jsonl = "".join(json.dumps({"text": v.rstrip("\n")}) + "\n" for v in tail).encode()
    (d / "verses.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    (d / "plays").mkdir()
    for p in shakespeare_files[:12]:
        (d / "plays" / p.name).write_bytes(p.read_bytes())
    m = {"name": "ray", "tokenizer": str(small_tokenizer), "output": "out",
         "shard_tokens": 200_000, "unit_bytes": 32 * 1024, "validation": 0.05,
         "sources": [{"path": str(d / "plays"), "format": "text", "split": "file"},
                     {"path": str(d / "verses.txt"), "split": "line"},
                     {"path": str(d / "verses.jsonl.zst")}]}
    (d / "pack.yaml").write_text(yaml.safe_dump(m))
    return d / "pack.yaml"


@pytest.fixture(scope="module")
def local(manifest) -> tuple[int, dict[str, bytes]]:
    out = manifest.parent / "local"
    r = pack(manifest, out=out, workers=2, progress=False)
    assert r.units > 40 and r.documents > 10_000
    return r.documents, _files(out)


@pytest.mark.parametrize("workers", [1, None])
def test_ray_pack_is_byte_identical_to_local(workers, manifest, local, ray_address, tmp_path):
    out = tmp_path / "out"
    r = pack(manifest, out=out, workers=workers, progress=False, executor="ray")
    assert not r.up_to_date and r.units_done == r.units
    assert (r.documents, _files(out)) == local
    # one fingerprint, whatever ran the units: "up to date" for either executor
    assert pack(manifest, out=out, progress=False, executor="ray").up_to_date
    assert pack(manifest, out=out, progress=False).up_to_date


def test_a_killed_task_is_retried(manifest, local, ray_address, tmp_path):
    import psutil

    out = tmp_path / "out"
    killed: list[int] = []

    def kill_one_task() -> None:   # SIGKILL a Ray worker while it runs a unit, once
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            if len(list((out / ".work").glob("unit-*.npz"))) >= 4:
                for p in psutil.Process().children(recursive=True):
                    try:
                        if " ".join(p.cmdline()).startswith(TASK_TITLE):
                            p.send_signal(signal.SIGKILL)
                            killed.append(p.pid)
                            return
                    except psutil.Error:
                        pass
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one_task, daemon=True)
    killer.start()
    r = pack(manifest, out=out, workers=2, progress=False, executor="ray")
    killer.join()
    assert killed, "no Ray worker was seen running a unit"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == "zombie"
    assert r.units_done == r.units                   # the killed unit was redone by Ray
    assert (r.documents, _files(out)) == local


def test_a_killed_driver_resumes_to_identical_output(manifest, local, ray_address, tmp_path):
    out = tmp_path / "out"
    work = out / ".work"
    proc = subprocess.Popen([sys.executable, "-m", "qovaryx_data.cli", "pack", "--manifest",
                             str(manifest), "--out", str(out), "--executor", "ray",
                             "--ray-address", ray_address, "--workers", "2", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (time.monotonic() < deadline and proc.poll() is None
           and not (work.is_dir() and len(list(work.glob("unit-*.npz"))) >= 8)):
        time.sleep(0.005)
    assert proc.poll() is None, f"pack ended before it could be killed: {proc.stderr.read()!r}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "train" / "dataset.json").exists()
    time.sleep(1.0)   # Ray ends the dead driver's tasks; a late one only rewrites a part as it was
    done_before = len(list(work.glob("unit-*.npz")))

    resumed = pack(manifest, out=out, workers=2, progress=False, executor="ray")
    assert not resumed.up_to_date
    assert resumed.units_done <= resumed.units - done_before   # finished units were kept
    assert not work.exists()
    assert (resumed.documents, _files(out)) == local
    assert pack(manifest, out=out, progress=False, executor="ray").up_to_date
