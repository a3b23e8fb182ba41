"""`qovaryx-data train-bpe` (the CLI, as a user runs it) vs a bare `tokenizers` BpeTrainer.

Both run in fresh subprocesses over the same documents (one per play) of the same real corpus,
the 42 Shakespeare plays (../shared/corpora/shakespeare, else the demo's cache), with the same
trainer settings; wall time and peak RSS (os.wait4 rusage of each child) are measured for each,
alternating the two, and the medians' ratios are printed. Goal: <= 1.10x time, <= 1.20x memory.

    .venv/bin/python benchmarks/bench_train_bpe.py [--repeats 11] [--corpus DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPORA = (REPO.parent / "shared" / "corpora" / "shakespeare", REPO / "build" / "corpus" / "shakespeare")

# The same training as qovaryx_data.tokenizer, written directly against tokenizers.
BASELINE = r"""
import sys
from pathlib import Path
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
corpus, out = Path(sys.argv[1]), sys.argv[2]
files = sorted(corpus.glob("*_gut.txt"))
specials = ["<|endoftext|>", "<|pad|>", "<|image_start|>", "<|image_end|>", "<|decision|>",
            "<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>"]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=20242, min_frequency=2, show_progress=False,
                              special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
def docs():
    for f in files:
        yield f.read_text(encoding="utf-8")
tok.train_from_iterator(docs(), trainer, length=len(files))
tok.save(out + "/tokenizer.json")
"""


def run(cmd: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds (user + system) of one fresh child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{err}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime   # Linux: maxrss in KiB


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "qovaryx-data"
    if script.exists():
        return [str(script)]
    found = shutil.which("qovaryx-data")
    return [found] if found else [sys.executable, "-m", "qovaryx_data.cli"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=11, help="timed runs of each (after one warm-up); 5 is noisy here")
    ap.add_argument("--corpus", type=Path, default=next((c for c in CORPORA if c.exists()), None),
                    help="folder of *_gut.txt files")
    args = ap.parse_args()
    if args.corpus is None or not any(args.corpus.glob("*_gut.txt")):
        sys.exit(f"no corpus: none of {[str(c) for c in CORPORA]} holds *_gut.txt (run `make demo`)")
    files = sorted(args.corpus.glob("*_gut.txt"))
    mb = sum(f.stat().st_size for f in files) / 1e6

    with tempfile.TemporaryDirectory() as tmp:
        ours_out, bare_out = Path(tmp, "ours"), Path(tmp, "bare")
        bare_out.mkdir()
        ours = cli_command() + ["train-bpe", *map(str, files), "--out", str(ours_out),
                                "--no-progress", "--force"]
        bare = [sys.executable, "-c", BASELINE, str(args.corpus), str(bare_out)]
        results: dict[str, list[tuple[float, int, float]]] = {"ours": [], "bare": []}
        for i in range(args.repeats + 1):   # alternate so drift hits both alike; run 0 warms caches
            for name, cmd in (("bare", bare), ("ours", ours)) if i % 2 else (("ours", ours), ("bare", bare)):
                r = run(cmd)
                if i:
                    results[name].append(r)

        # Same work: the same vocabulary and merges.
        a = json.loads((ours_out / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        b = json.loads((bare_out / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        same = a["vocab"] == b["vocab"] and a["merges"] == b["merges"]

    t = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    m = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    c = {k: statistics.median(r[2] for r in v) for k, v in results.items()}
    print(f"corpus: {len(files)} files, {mb:.1f} MB ({args.corpus}); vocab 20242; "
          f"{args.repeats} runs each, medians; python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    print(f"same vocabulary and merges: {same}")
    print(f"{'':6} {'wall s':>8} {'cpu s':>8} {'peak RSS MiB':>13}")
    for k in ("bare", "ours"):
        print(f"{k:6} {t[k]:8.3f} {c[k]:8.3f} {m[k] / 2**20:13.1f}")
    print(f"time ratio   ours/bare: {t['ours'] / t['bare']:.3f}x wall  (goal <= 1.10x); "
          f"{c['ours'] / c['bare']:.3f}x cpu")
    print(f"memory ratio ours/bare: {m['ours'] / m['bare']:.3f}x peak RSS  (goal <= 1.20x)")
    if not same:
        sys.exit("the two tokenizers differ: the comparison is not like for like")


if __name__ == "__main__":
    main()
