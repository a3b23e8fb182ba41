"""GPU check for qovaryx_model (needs a CUDA GPU; a few minutes on one H100/H200).

  0. correctness on the GPU: KV-cache greedy == full-forward greedy; flash-attn == SDPA (bf16).
  1. bare-loop MFU of the 350m preset (card defaults: MTP-K=4) at seq 2048, bf16 autocast, one full
     training step (forward + backward + AdamW) with SDPA (also 4 packed documents per row, document
     masking) and, if installed, flash-attn 2: the ceiling the trainer is measured against.
  2. bare-loop peak memory of the 1b preset at batch 1, seq 2048, bf16 weights, 8-bit AdamW.
  3. the trainer itself: `train()` with pipelines/recipes/350m.yaml at seq 2048 (batch --batch x
     2048, bf16 autocast; also bf16 parameters, and flash-attn when installed) -> MFU from
     metrics.jsonl (goal >= 45% on an H100-class GPU); 1b.yaml without MTP (mtp_k 1) at batch 1
     (tokens_per_batch 2048), seq 2048, param_dtype bf16, adamw_8bit, activation checkpointing ->
     peak memory `peak_mem_mb` (goal <= 12 GB). The data is packed on the spot from the repository's
     own text (docs, sources) with a tokenizer of the card's vocabulary trained there.

FLOPs per token and the peak table are the trainer's (qovaryx_model.trainer.metrics:
`flops_per_token`, `PEAK_BF16_FLOPS`; --peak-tflops or QOVARYX_PEAK_FLOPS for a GPU not in it).
Prints one summary table at the end; exits 1 when a goal is missed or a check fails.

    python benchmarks/gpu_check.py                 # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run       # CPU: run every code path once on the debug preset
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from qovaryx_model import QovaryxConfig, QovaryxForCausalLM, parameter_counts
from qovaryx_model import attention
from qovaryx_model.trainer.metrics import PEAK_BF16_FLOPS, flops_per_token, peak_flops

REPO = Path(__file__).resolve().parents[1]
MFU_GOAL, MEM_GOAL_BYTES = 0.45, 12e9  # the goals: MFU on an H100-class GPU; the card's "12 GB"
H100_CLASS = ("H100", "H200", "H800", "GH200")

def train_step_fn(model, ids, opt, autocast: bool, docs=None):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids, document_ids=docs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def make_optimizer(params, prefer_8bit: bool, device: str):
    if prefer_8bit:
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=0.1), "bitsandbytes AdamW8bit"
        except Exception as e:  # noqa: BLE001 - report and fall back
            print(f"  (bitsandbytes unavailable: {type(e).__name__}: {e}; using torch AdamW)")
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=device == "cuda"), "torch AdamW"


def mfu(preset: str, backend: str, batch: int, seq: int, steps: int, device: str, peak: float | None,
        n_docs: int = 1, **kw):
    """Time training steps; `n_docs` > 1 packs that many equal documents per row (document masking:
    a dense mask with SDPA, varlen segments with flash-attn)."""
    cfg = QovaryxConfig.from_preset(preset, attn_backend=backend, **kw)
    torch.manual_seed(0)
    model = QovaryxForCausalLM(cfg).to(device).train()
    opt, _ = make_optimizer(model.parameters(), False, device)
    ids = torch.randint(8, cfg.vocab_size, (batch, seq), device=device)
    docs = None
    if n_docs > 1:
        docs = (torch.arange(seq, device=device) * n_docs // seq).expand(batch, seq).contiguous()
    step = train_step_fn(model, ids, opt, autocast=device == "cuda", docs=docs)
    calls = {"flash": 0}
    fa = attention._flash_attn()
    if fa is not None:  # count flash-attn calls to prove the kernel is used, not the SDPA fallback
        originals = {n: getattr(fa, n) for n in ("flash_attn_func", "flash_attn_varlen_func")}

        def counting(fn):
            def counted(*a, **k):
                calls["flash"] += 1
                return fn(*a, **k)
            return counted
        for n, fn in originals.items():
            setattr(fa, n, counting(fn))
    try:
        for _ in range(3):
            step()
        sync(device)
        calls["flash"] = 0
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        dt = (time.perf_counter() - t0) / steps
    finally:
        if fa is not None:
            for n, fn in originals.items():
                setattr(fa, n, fn)
    flops = flops_per_token(cfg, seq) * batch * seq
    what = f", {n_docs} docs/row" if n_docs > 1 else ""
    line = (f"  {preset} {backend:<5} mtp_k={cfg.mtp_k}{what} batch {batch} x seq {seq}: {dt * 1e3:.1f} ms/step, "
            f"{batch * seq / dt:,.0f} tok/s, {flops / dt / 1e12:.1f} TFLOP/s")
    if peak:
        line += f", MFU {flops / dt / peak:.1%}"
    if backend == "flash":
        line += f" (flash-attn calls in timed steps: {calls['flash']})"
    print(line)
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return flops / dt / peak if peak else None


def peak_memory(preset: str, seq: int, device: str, bf16_weights: bool, **kw):
    cfg = QovaryxConfig.from_preset(preset, **kw)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = QovaryxForCausalLM(cfg).to(device)
    if bf16_weights:
        model = model.to(torch.bfloat16)
    opt, opt_name = make_optimizer(model.parameters(), True, device)
    ids = torch.randint(8, cfg.vocab_size, (1, seq), device=device)
    step = train_step_fn(model, ids, opt, autocast=device == "cuda" and not bf16_weights)
    for _ in range(2):  # the optimizer state exists from the first step on
        step()
    sync(device)
    what = "bf16 weights" if bf16_weights else "fp32 weights + bf16 autocast"
    if device == "cuda":
        alloc, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
        print(f"  {preset} batch 1 x seq {seq}, {what}, {opt_name}: peak allocated {alloc:.2f} GiB, "
              f"reserved {reserved:.2f} GiB ({parameter_counts(cfg)['total'] / 1e9:.3f}B parameters)")
    else:
        print(f"  {preset} dry run ({what}, {opt_name}): step ran")
    del model, opt


def correctness(device: str) -> bool:
    """On the device: KV-cache greedy decoding equals full-forward greedy (fp32), and flash-attn
    (when installed) matches SDPA in bf16 with and without document masking."""
    ok = True
    torch.manual_seed(0)
    cfg = QovaryxConfig.from_preset("debug", vocab_size=512)
    model = QovaryxForCausalLM(cfg).to(device).eval()
    prompt = torch.randint(8, 512, (2, 9), device=device)
    with torch.no_grad():
        ref = prompt
        for _ in range(16):
            ref = torch.cat([ref, model(input_ids=ref, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        gen = model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    same = torch.equal(gen, ref)
    ok &= same
    print(f"  KV-cache greedy == full-forward greedy (fp32, 16 tokens): {'PASS' if same else 'FAIL'}")
    if attention._flash_attn() is None:
        print("  flash-attn not installed: flash vs SDPA comparison skipped")
        return ok
    ids = torch.randint(8, 512, (2, 64), device=device)
    docs = (torch.arange(64, device=device) // 20).expand(2, 64)
    for name, kw in (("causal", {}), ("document mask", {"document_ids": docs})):
        outs = {}
        for backend in ("sdpa", "flash"):
            model.config.attn_backend = backend
            for layer in list(model.model.layers) + [d.block for d in model.mtp]:
                layer.self_attn.backend = backend
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
                outs[backend] = model(input_ids=ids, labels=ids, **kw)
        diff = (outs["sdpa"].logits.float() - outs["flash"].logits.float()).abs().max().item()
        close = diff < 5e-2 and abs(outs["sdpa"].loss.item() - outs["flash"].loss.item()) < 1e-2
        ok &= close
        print(f"  flash vs SDPA, bf16, {name}: max |logit diff| {diff:.2e}, loss {outs['sdpa'].loss.item():.4f} vs "
              f"{outs['flash'].loss.item():.4f}: {'PASS' if close else 'FAIL'}")
    return ok


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def pack_repo_text(work: Path, vocab_size: int, patterns: tuple[str, ...]) -> Path:
    """Packed training data made here from the repository's own text (docs, README, sources: they
    travel with the working tree), plus seeded made-up words so the byte-level BPE reaches
    `vocab_size` (the card's vocabulary on the GPU run) on this small corpus."""
    import numpy as np

    from qovaryx_data import pack, train_bpe

    files = sorted(p for pat in patterns for p in REPO.glob(pat))
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, int(rng.integers(4, 10)))) for _ in range(3 * vocab_size)]
    (work / "words.txt").write_text("\n".join(" ".join(words[j:j + 12]) for j in range(0, len(words), 12)) * 2)
    texts = [str(f) for f in files] + [str(work / "words.txt")]
    train_bpe(texts, out=work / "tok", vocab_size=vocab_size, min_frequency=1, allow_smaller_vocab=True,
              format="text")
    manifest = {"name": "repo-text", "tokenizer": str(work / "tok"), "output": str(work / "packed"), "validation": 0.0,
                "sources": [{"path": t, "format": "text", "split": "file"} for t in texts]}
    (work / "pack.yaml").write_text(json.dumps(manifest))  # JSON is YAML
    pack(work / "pack.yaml", workers=1, progress=False)
    return work / "packed"


def trainer_run(name: str, recipe: str, overrides: dict, data: Path, out: Path, steps: int, skip: int) -> dict:
    """`train()` with a shipped recipe and --max-steps; the medians of metrics.jsonl's steady steps
    (the first `skip` dropped: compilation, allocator warm-up) and the peak memory of the run."""
    from qovaryx_model.trainer import train

    res = train(REPO / "pipelines" / "recipes" / recipe, data, out=out / name, max_steps=steps, overrides=overrides,
                progress=False)
    rows = [json.loads(x) for x in res.metrics.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if not r.get("eval")]
    steady = rows[skip:] or rows[-1:]

    def med(k):
        v = sorted(r[k] for r in steady if k in r)
        return v[len(v) // 2] if v else None

    row = {"name": name, "steps": len(rows), "mfu": med("mfu"), "tokens_per_s": med("tokens_per_s"),
           "data_wait": med("data_wait"), "peak_mem_mb": max(r["peak_mem_mb"] for r in rows)}
    mfu_s = f"MFU {row['mfu']:.1%}" if row["mfu"] is not None else "MFU n/a (no peak for this device)"
    print(f"  {name}: {len(rows)} steps, {row['tokens_per_s']:,.0f} tok/s, {mfu_s}, data wait "
          f"{row['data_wait']:.1%}, peak {row['peak_mem_mb']:,.0f} MiB")
    del res
    import gc

    gc.collect()  # the run's model and optimizer state, before the next run's peak is measured
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def trainer_checks(device: str, dry: bool, batch: int, steps: int) -> list[dict]:
    """The trainer (`train()` with the shipped recipes) on the GPU: the 350m MFU and the 1b peak memory.
    `dry`: the same calls on the debug preset on CPU."""
    common = {"eval_every": 0, "save_every": 0, "keep_checkpoints": 1, "class_weighted_decision": False}
    seq = 64 if dry else 2048
    # dry: the debug preset (low-rank experts of rank <= its d_model) and a made-up peak, so MFU is computed
    preset = {"preset": "debug", "ffn_rank": 16, "peak_flops": 1e12} if dry else {}
    mfu_run = {**common, **preset, "max_seq_len": seq, "tokens_per_batch": batch * seq,
               "grad_accum_steps": 1, "mixed_precision": "bf16", "num_workers": 0 if dry else 2}
    mem_run = {**common, **preset, "mtp_k": 1, "max_seq_len": seq, "tokens_per_batch": seq, "grad_accum_steps": 1,
               "param_dtype": "bf16", "optimizer": "adamw_8bit", "activation_checkpointing": True,
               "mixed_precision": "bf16", "num_workers": 0 if dry else 2}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        vocab = 512 if dry else QovaryxConfig.from_preset("350m").vocab_size
        data = pack_repo_text(work, vocab, ("docs/*.md",) if dry else
                              ("*.md", "docs/*.md", "qovaryx_*/**/*.py", "pipelines/**/*.py", "tests/*.py"))
        skip = 1 if dry else 3
        rows = [trainer_run("350m bf16 autocast (350m.yaml)", "350m.yaml", mfu_run, data, work, steps, skip),
                trainer_run("350m bf16 params (350m.yaml)", "350m.yaml", {**mfu_run, "param_dtype": "bf16"}, data,
                            work, steps, skip)]
        if attention._flash_attn() is not None or dry:
            rows.append(trainer_run("350m flash-attn (350m.yaml)", "350m.yaml", {**mfu_run, "attn_backend": "flash"},
                                    data, work, steps, skip))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows.append(trainer_run("1b mtp_k=1 batch 1 (1b.yaml)", "1b.yaml", mem_run, data, work, max(3, steps // 4), 0))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="run every code path on CPU with the debug preset")
    ap.add_argument("--batch", type=int, default=8, help="sequences of 2048 per step for the MFU measurements")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per bare MFU measurement")
    ap.add_argument("--trainer-steps", type=int, default=15, help="--max-steps of each trainer run (3 are skipped)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU, if not in "
                    "qovaryx_model.trainer.metrics.PEAK_BF16_FLOPS (also QOVARYX_PEAK_FLOPS)")
    args = ap.parse_args(argv)
    if args.peak_tflops:
        import os

        os.environ["QOVARYX_PEAK_FLOPS"] = str(args.peak_tflops * 1e12)  # the trainer reads it too

    if args.dry_run:
        print("dry run on CPU with the debug preset (no MFU or memory figures):")
        mfu("debug", "sdpa", 2, 64, 1, "cpu", None)
        mfu("debug", "flash", 2, 64, 1, "cpu", None)  # falls back to SDPA without CUDA / flash-attn
        mfu("debug", "sdpa", 2, 64, 1, "cpu", None, n_docs=4)
        ok = correctness("cpu")
        peak_memory("debug", 64, "cpu", bf16_weights=False)
        peak_memory("debug", 64, "cpu", bf16_weights=True)
        print("trainer runs (train() with the shipped recipes, debug preset):")
        rows = trainer_checks("cpu", True, 2, 3)
        cfg = QovaryxConfig.from_preset("350m")
        print(f"flops of one 350m step at batch 8 x 2048: {flops_per_token(cfg, 2048) * 8 * 2048:.3e}")
        summary(rows, None, "cpu (dry run)", ok, enforce=False)
        return 0 if ok else 1
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False). "
              "Use --dry-run to exercise the code paths on CPU.", file=sys.stderr)
        return 2

    name = torch.cuda.get_device_name()
    peak = peak_flops(torch.device("cuda"))
    fa = attention._flash_attn()
    known = ", ".join(k for k, _ in PEAK_BF16_FLOPS)
    print(f"{name}; torch {torch.__version__}; flash-attn {getattr(fa, '__version__', 'not installed')}; "
          f"peak bf16 {f'{peak / 1e12:.0f} TFLOP/s' if peak else f'unknown (pass --peak-tflops; table: {known})'}")
    print("[0] correctness on the GPU:")
    ok = correctness("cuda")
    print("[1] bare-loop MFU, 350m preset, seq 2048, bf16 autocast, fwd+bwd+AdamW (no trainer):")
    mfu("350m", "sdpa", args.batch, 2048, args.steps, "cuda", peak)
    mfu("350m", "sdpa", args.batch, 2048, args.steps, "cuda", peak, n_docs=4)
    if fa is not None:
        mfu("350m", "flash", args.batch, 2048, args.steps, "cuda", peak)
    else:
        print("  flash-attn not installed: SDPA only")
    print("[2] bare-loop peak memory, 1b preset (MTP-K=4), batch 1, seq 2048, one training step:")
    peak_memory("1b", 2048, "cuda", bf16_weights=True)
    print("[3] the trainer: train() with pipelines/recipes/350m.yaml and 1b.yaml, --max-steps:")
    rows = trainer_checks("cuda", False, args.batch, args.trainer_steps)
    return summary(rows, peak, name, ok, enforce=True)


def summary(rows: list[dict], peak: float | None, name: str, ok: bool, enforce: bool) -> int:
    """One table of the trainer's figures against the goals; 1 when a goal is missed (or a check failed)."""
    h100 = any(k in name for k in H100_CLASS)
    print(f"\nsummary ({name}; trainer figures are medians of metrics.jsonl's steady steps)")
    print(f"{'run':<34}{'tok/s':>12}{'MFU':>8}{'wait':>7}{'peak MiB':>10}  goal")
    failed = not ok
    for r in rows:
        if r["name"].startswith("1b"):
            met = r["peak_mem_mb"] * 2**20 <= MEM_GOAL_BYTES
            goal = f"peak <= {MEM_GOAL_BYTES / 1e9:.0f} GB: {'MET' if met else 'MISSED'}"
        elif r["name"].startswith("350m bf16 autocast"):
            met = r["mfu"] is not None and r["mfu"] >= MFU_GOAL
            goal = (f"MFU >= {MFU_GOAL:.0%}: {'MET' if met else 'MISSED'}" if h100
                    else f"MFU >= {MFU_GOAL:.0%} (H100-class only; not judged here)")
            met = met or not h100
        else:
            met, goal = True, "(for comparison)"
        failed |= enforce and not met
        mfu_s = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{r['name']:<34}{r['tokens_per_s']:>12,.0f}{mfu_s:>8}{r['data_wait']:>7.1%}{r['peak_mem_mb']:>10,.0f}  {goal}")
    print(f"correctness checks: {'PASS' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
