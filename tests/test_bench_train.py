"""benchmarks/bench_train.py's --dry-run: every code path (trainer, bare loop, 8-bit
AdamW, optimizer-state bytes, the Fashion-MNIST runs) on tiny sizes. Timings are not asserted (the
machine is shared)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_dry_run(tmp_path, shakespeare_dir, fashion_mnist_dir, capsys):
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main(["--dry-run", "--corpus", str(shakespeare_dir), "--images-dir", str(fashion_mnist_dir),
                       "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert math.isfinite(res["trainer_vs_bare"]) and res["trainer_vs_bare"] > 0
    assert 0 <= res["data_wait_mean"] < 1
    # bitsandbytes' block-wise 8-bit state: 2 bytes per element (+ absmax, small tensors in fp32) vs 8
    assert 0 < res["state_bytes"]["adamw_8bit"] < 0.5 * res["state_bytes"]["adamw"]
    assert set(res["fmnist"]) == {"0.0", "0.2"} and all(0 <= m["accuracy"] <= 1 and 0 <= m["ece"] <= 1
                                                         for m in res["fmnist"].values())
    assert "trainer tokens/s / bare loop" in capsys.readouterr().out
