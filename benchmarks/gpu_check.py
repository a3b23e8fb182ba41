"""GPU check for qovaryx_model (needs a CUDA GPU; well under 5 minutes on one H100).

  0. correctness on the GPU: KV-cache greedy == full-forward greedy; flash-attn == SDPA (bf16).
  1. MFU of the 350m preset (card defaults: MTP-K=4, untied head) at seq 2048, bf16 autocast,
     one full training step (forward + backward + AdamW), with SDPA and, if installed, flash-attn 2;
     also with mtp_k=1 and with 4 packed documents per row (document masking).
  2. Peak GPU memory of the 1b preset at batch 1, seq 2048 for one training step: bf16 autocast over
     fp32 weights, and pure bf16 weights; 8-bit AdamW (bitsandbytes) when it imports, else torch AdamW.

FLOPs per step = 6 * (tokens through each matmul weight) + attention 12 * L_eff * d * T per token
(PaLM convention, full not causal attention), where the MTP depths count as extra layers on T - k
tokens. MFU = FLOPs / step time / peak dense bf16 FLOP/s of the GPU (table below or --peak-tflops).

    python benchmarks/gpu_check.py                 # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run       # CPU: run every code path once on the debug preset
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from qovaryx_model import QovaryxConfig, QovaryxForCausalLM, parameter_counts
from qovaryx_model import model as qmodel

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
               "H100": 756.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "RTX 4090": 165.2, "RTX 5090": 209.5,
               "RTX 4080": 97.5, "RTX 5080": 112.6, "RTX 5070 Ti": 87.9}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():  # ordered: specific names first
        if key in name:
            return value
    return None


def step_flops(cfg: QovaryxConfig, batch: int, seq: int) -> float:
    """Training FLOPs of one step (forward + backward = 3x forward), matmuls and attention."""
    counts = parameter_counts(cfg)
    d, V = cfg.d_model, cfg.vocab_size
    trunk_matmul = counts["trunk_blocks"] - cfg.n_layer * 2 * d  # minus the norms
    per_tok = 2 * (trunk_matmul + d * V) + 2 * 2 * cfg.n_layer * d * seq  # fwd: weights + QK^T and AV
    flops = per_tok * seq
    mtp_per_depth = counts["mtp_modules"] // max(cfg.n_mtp_modules, 1) - 5 * d  # minus 5 norms
    for k in range(1, cfg.n_mtp_modules + 1):
        L = seq - k
        flops += (2 * (mtp_per_depth + d * V) + 2 * 2 * d * L) * L
    return 3.0 * flops * batch


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
    fa = qmodel._flash_attn()
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
    flops = step_flops(cfg, batch, seq)
    what = f", {n_docs} docs/row" if n_docs > 1 else ""
    line = (f"  {preset} {backend:<5} mtp_k={cfg.mtp_k}{what} batch {batch} x seq {seq}: {dt * 1e3:.1f} ms/step, "
            f"{batch * seq / dt:,.0f} tok/s, {flops / dt / 1e12:.1f} TFLOP/s")
    if peak:
        line += f", MFU {flops / dt / (peak * 1e12):.1%}"
    if backend == "flash":
        line += f" (flash-attn calls in timed steps: {calls['flash']})"
    print(line)
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()


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
    if qmodel._flash_attn() is None:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="run every code path on CPU with the debug preset")
    ap.add_argument("--batch", type=int, default=8, help="batch size for the MFU measurement")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per MFU measurement")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU, if not in the table")
    args = ap.parse_args(argv)

    if args.dry_run:
        print("dry run on CPU with the debug preset (no MFU or memory figures):")
        mfu("debug", "sdpa", 2, 64, 1, "cpu", None)
        mfu("debug", "flash", 2, 64, 1, "cpu", None)  # falls back to SDPA without CUDA / flash-attn
        mfu("debug", "sdpa", 2, 64, 1, "cpu", None, n_docs=4)
        correctness("cpu")
        peak_memory("debug", 64, "cpu", bf16_weights=False)
        peak_memory("debug", 64, "cpu", bf16_weights=True)
        print(f"flops of one 350m step at batch 8 x 2048: {step_flops(QovaryxConfig.from_preset('350m'), 8, 2048):.3e}")
        return 0
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False). "
              "Use --dry-run to exercise the code paths on CPU.", file=sys.stderr)
        return 2

    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(name)
    fa = qmodel._flash_attn()
    print(f"{name}; torch {torch.__version__}; flash-attn {getattr(fa, '__version__', 'not installed')}; "
          f"peak bf16 {peak or 'unknown (pass --peak-tflops)'} TFLOP/s")
    print("[0] correctness on the GPU:")
    ok = correctness("cuda")
    print("[1] MFU, 350m preset, seq 2048, bf16 autocast, fwd+bwd+AdamW:")
    mfu("350m", "sdpa", args.batch, 2048, args.steps, "cuda", peak)
    mfu("350m", "sdpa", args.batch, 2048, args.steps, "cuda", peak, mtp_k=1)
    mfu("350m", "sdpa", args.batch, 2048, args.steps, "cuda", peak, n_docs=4)
    if fa is not None:
        mfu("350m", "flash", args.batch, 2048, args.steps, "cuda", peak)
        mfu("350m", "flash", args.batch, 2048, args.steps, "cuda", peak, n_docs=4)
    else:
        print("  flash-attn not installed: SDPA only")
    print("[2] peak memory, 1b preset (MTP-K=4), batch 1, seq 2048, one training step:")
    peak_memory("1b", 2048, "cuda", bf16_weights=False)
    peak_memory("1b", 2048, "cuda", bf16_weights=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
