"""`train()`: the training loop, in one function. Setup lives in setup.py, the data in data.py,
optimizers and the schedule in optim.py, checkpoints in checkpoint.py, reporting in metrics.py.

One optimizer step:
  1. take this rank's micro-batches of the step from the loader (timed: the data wait);
  2. count every loss term's targets over all of them and all-reduce the counts (before any backward);
  3. forward + backward each micro-batch with those step-wide counts (`num_items_in_batch`), so the
     micro-batch losses add up to the step's exact per-target means (DDP syncs only the last one);
  4. clip, step, schedule; log every term; evaluate / checkpoint when due.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from . import checkpoint as ckpt
from .data import BatchLoader, PlanStream, Sampler, as_batch, eval_plans, keep_as_is, resolve_data, token_bytes
from .metrics import MetricsLog, Throughput, bits_per_byte, flops_per_token, fmt_tokens, peak_flops
from .optim import Schedule, build_optimizer
from .recipe import Recipe, TrainerError, load_recipe
from .setup import (build_model, check_data_fits, check_tokenizer, decision_class_weights, fresh_config,
                    init_config, init_distributed, open_data, wrap_model)

TERMS = ("loss", "lm_loss", "mtp_loss", "decision_loss", "calibration_loss", "moe_aux_loss", "moe_z_loss")


@dataclass
class TrainResult:
    out: Path  # the run folder
    checkpoint: Path | None  # the final checkpoint (an AutoModelForCausalLM folder)
    step: int  # optimizer steps done
    tokens: int  # training tokens consumed (sequence slots x length)
    seconds: float  # wall time of this invocation's training loop
    tokens_per_s: float
    val_loss: float | None  # last validation next-token loss (nats/token)
    metrics: Path  # metrics.jsonl
    loss_png: Path | None
    stopped_by_signal: bool = False
    model: torch.nn.Module | None = field(default=None, repr=False)  # the trained model (unwrapped), in memory


def train(recipe: str | Path | Recipe, data=None, *, out: str | Path, val_data=None, max_steps: int | None = None,
          resume: bool = False, init_from: str | Path | None = None, overrides: dict | None = None,
          progress: bool = True) -> TrainResult:
    """Train a Qovaryx model on packed datasets (see docs/TRAINING.md)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        recipe = load_recipe(mapping={**recipe.to_dict(), **overrides})
    out = Path(out)
    dd = init_distributed()
    if recipe.grad_accum_steps % dd.world:
        raise TrainerError(f"grad_accum_steps={recipe.grad_accum_steps} is not divisible by the {dd.world} ranks: "
                           "each rank runs grad_accum_steps / world_size micro-batches")
    specs, implied_val = resolve_data(data if data is not None else recipe.data, "--data" if data is not None
                                      else "recipe key 'data'" + (f" in {recipe.source}" if recipe.source else ""))
    rd = open_data(specs, Path(val_data) if val_data is not None else implied_val)

    start_step, tokens, resumed_from = 0, 0, None
    if resume:
        resumed_from = ckpt.latest_checkpoint(out)
        if resumed_from is None and dd.main:
            print(f"--resume: no checkpoint in {out / 'checkpoints'} yet; starting from scratch", file=sys.stderr)
    if resumed_from is not None:
        cfg, source = init_config(recipe, resumed_from, "cannot --resume from"), resumed_from
    elif init_from is not None:
        check_tokenizer(Path(init_from), rd, "--init-from")
        cfg, source = init_config(recipe, Path(init_from)), Path(init_from)
    else:
        cfg, source = fresh_config(recipe, rd), None
    check_data_fits(cfg, recipe, rd)
    if recipe.class_weighted_decision and cfg.decision_head_enabled:
        cfg.decision_class_weights = decision_class_weights(rd, cfg.decision_num_classes)
    model = build_model(cfg, recipe.seed, dd.device, source, recipe.param_dtype)
    if recipe.activation_checkpointing:
        model.model.gradient_checkpointing = True
    fsdp = dd.world > 1 and recipe.distributed == "fsdp"
    wrapped = wrap_model(model, fsdp, dd)  # before the optimizer: FSDP2 replaces the parameters
    optimizer = build_optimizer(model, recipe, dd.device)
    schedule = Schedule(optimizer, recipe)
    sampler = Sampler(rd.train, rd.weights, recipe, recipe.seed)
    meta_now = {"tokenizer_hash": rd.tokenizer_hash, "datasets": rd.fingerprints, "recipe_math": recipe.math_dict()}
    if resumed_from is not None:
        meta = ckpt.read_meta(resumed_from)
        ckpt.compare_meta(meta, meta_now, resumed_from)
        state = ckpt.load_state(resumed_from)
        ckpt.load_optimizer_state(model, optimizer, state["optimizer"], fsdp)
        schedule.load_state_dict(state["schedule"])
        sampler.load_state_dict(state["sampler"])
        ckpt.set_rng_state(state["rng"])
        start_step, tokens = int(meta["step"]), int(meta["tokens"])

    forward = torch.compile(wrapped) if recipe.compile else wrapped
    use_bf16 = recipe.mixed_precision == "bf16" and (dd.device.type == "cuda" or recipe.autocast_cpu)
    autocast = (lambda: torch.autocast(dd.device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    image_shape = (cfg.image_size, cfg.image_size, cfg.image_channels) if cfg.chart_patch_encoder_enabled else None
    cuda = dd.device.type == "cuda"
    loader_ds = BatchLoader(rd.train, image_shape, cfg.decision_head_enabled,
                            as_numpy=not cuda and recipe.num_workers > 0)
    loader = torch.utils.data.DataLoader(
        loader_ds, sampler=PlanStream(sampler, dd.rank, dd.world), batch_size=None, collate_fn=keep_as_is,
        num_workers=recipe.num_workers, pin_memory=cuda, prefetch_factor=4 if recipe.num_workers else None,
        persistent_workers=False)
    val_plans = (eval_plans(rd.val, recipe.max_seq_len, recipe.eval_tokens, recipe.tokens_per_batch)
                 if rd.val is not None else [])
    if rd.val is not None and not val_plans and dd.main:
        warnings.warn(f"validation data {rd.val.path} holds no window of {recipe.max_seq_len + 1} tokens and no "
                      "image or label row: this run reports no validation loss. Pack a larger validation share "
                      "(validation: in the manifest) or give --val-data")
    val_loader = BatchLoader([rd.val], image_shape, cfg.decision_head_enabled) if rd.val is not None else None
    nbytes = (torch.as_tensor(token_bytes(rd.tokenizer_dir, cfg.vocab_size), device=dd.device)
              if rd.val is not None else None)

    end_step = recipe.total_steps if max_steps is None else min(recipe.total_steps, max_steps)
    log = MetricsLog(out, start_step if resumed_from is not None else None, recipe.tensorboard, dd.main)
    peak = peak_flops(dd.device, recipe.peak_flops)
    stop = {"signal": False}
    old_handler = _on_sigterm(stop)
    bar = _progress(progress and dd.main, start_step, end_step)
    per_rank = recipe.grad_accum_steps // dd.world
    val_loss, last_ckpt, t_start, steps_run, stopped = None, resumed_from, time.perf_counter(), 0, False

    def evaluate(step: int) -> float | None:
        if val_loader is None or not val_plans:
            return None
        row = run_eval(forward, val_loader, val_plans, dd, autocast, nbytes)
        log.write({"eval": True, "step": step, "tokens": tokens, **row})
        return row.get("val_loss")

    def save(step: int) -> Path:
        full_model, opt_state = ckpt.gather_states(model, optimizer, fsdp, dd.main)  # collective under FSDP
        state = {"optimizer": opt_state, "schedule": schedule.state_dict(),
                 "sampler": sampler_state, "rng": ckpt.rng_state()}
        meta = {"step": step, "tokens": tokens, "qovaryx_version": __version__, **meta_now,
                "recipe": recipe.to_dict(), "data_order_fingerprint": sampler_state["fingerprint"]}
        path = ckpt.save_checkpoint(out, step, full_model, rd.tokenizer_dir, state, meta, recipe.keep_checkpoints) \
            if dd.main else None
        if dd.world > 1:
            torch.distributed.barrier()
        return path if dd.main else ckpt.checkpoint_dir(out) / f"step-{step:08d}"

    sampler_state = sampler.state_dict()
    it = iter(loader) if start_step < end_step else None
    model.train()
    thr = Throughput()
    try:
        for step in range(start_step, end_step):
            t0 = time.perf_counter()
            items = [next(it) for _ in range(per_rank)]
            wait = time.perf_counter() - t0
            assert all(x["plan"]["step"] == step for x in items), "the loader and the loop agree on the step"
            L = items[0]["plan"]["seq_len"]  # the length the sampler planned these batches at (metrics report it)
            assert all(x["plan"]["seq_len"] == L for x in items), "one sequence length per step"
            sampler_state = items[-1]["plan"]["state"]
            batches = [_to(as_batch(x["batch"]), dd.device) for x in items]
            counts = _step_counts(model, batches, dd)
            lr_factor = schedule.apply(step)
            sums = {k: torch.zeros((), device=dd.device) for k in TERMS}
            for i, batch in enumerate(batches):
                sync = i == len(batches) - 1 or dd.world == 1 or recipe.distributed == "fsdp"
                ctx = wrapped.no_sync() if not sync and hasattr(wrapped, "no_sync") else contextlib.nullcontext()
                with ctx, autocast():
                    o = forward(**batch, num_items_in_batch=counts)
                with ctx:
                    (o.loss * dd.world).backward()  # DDP averages gradients over ranks; the counts are global
                for k in TERMS:
                    if getattr(o, k, None) is not None:
                        sums[k] += getattr(o, k).detach().float()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip if recipe.grad_clip > 0
                                                       else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # one all-reduce for the step's loss terms and the stop flag: torchrun signals each rank on its
            # own, and the ranks must stop at the same step (else one waits at the save's barrier). The flag
            # is read once, never written back: a signal after this point is acted on at the next step.
            reduced = dd.all_sum(torch.stack([sums[k] for k in TERMS]
                                             + [torch.tensor(float(stop["signal"]), device=dd.device)]))
            sums, stopping = dict(zip(TERMS, reduced[:-1])), bool(reduced[-1] > 0)
            tokens += recipe.tokens_per_step
            dt = thr.lap()
            row = {"step": step + 1, "tokens": tokens, "seq_len": L, "lr": recipe.lr * lr_factor,
                   **{k: float(v) for k, v in sums.items() if (k == "loss" or v != 0)},
                   "targets": int(counts["lm"]),
                   "grad_norm": float(getattr(grad_norm, "full_tensor", lambda: grad_norm)()),  # FSDP: a DTensor
                   "tokens_per_s": recipe.tokens_per_step / dt,
                   "data_wait": wait / dt, "step_time": dt, "data_order_fingerprint": sampler_state["fingerprint"],
                   "peak_mem_mb": _peak_mem_mb(dd.device)}
            if peak:
                row["mfu"] = flops_per_token(cfg, L) * row["tokens_per_s"] / (peak * dd.world)
            if not math.isfinite(row["loss"]):
                where = (f"the last checkpoint, {last_ckpt}, holds the weights that gave this loss: start from it "
                         "(or an earlier one) with --init-from and a lower lr" if last_ckpt
                         else "no checkpoint was written yet")
                raise TrainerError(f"step {step + 1}: the loss is {row['loss']} (lm {row.get('lm_loss')}); stopping. "
                                   f"{where}. Lower lr, raise warmup_steps or check the data")
            log.write(row)
            steps_run += 1
            if bar is not None:
                bar.update(1)
                if (step + 1) % recipe.log_every == 0:
                    bar.set_postfix_str(f"loss {row['loss']:.3f} lm {row['lm_loss']:.3f} L={L} "
                                        f"{fmt_tokens(row['tokens_per_s'])} tok/s wait {100 * row['data_wait']:.0f}%")
            done = step + 1 == end_step
            if recipe.eval_every and (step + 1) % recipe.eval_every == 0 and not done:
                val_loss = evaluate(step + 1)
                log.plot()
            if stopping or done or (recipe.save_every and (step + 1) % recipe.save_every == 0):
                if done:
                    val_loss = evaluate(step + 1)
                last_ckpt = save(step + 1)
            if stopping:
                stopped = True
                break
    finally:
        if bar is not None:
            bar.close()
        signal.signal(signal.SIGTERM, old_handler) if old_handler is not None else None
        del it
    seconds = time.perf_counter() - t_start
    png = log.plot()
    log.close()
    final_step = start_step + steps_run
    result = TrainResult(out, last_ckpt, final_step, tokens, seconds,
                         steps_run * recipe.tokens_per_step / seconds if steps_run else 0.0, val_loss, log.path, png,
                         stopped, model)
    if dd.main:  # the closing summary, with or without the progress bar
        vl = f"{val_loss:.4f} nats/token" if val_loss is not None else "n/a (no validation data)"
        print(f"[train] {final_step} steps, {fmt_tokens(tokens)} tokens in {seconds:.1f}s "
              f"({fmt_tokens(result.tokens_per_s)} tokens/s); validation loss {vl}; checkpoint {last_ckpt}",
              file=sys.stderr)
    return result


def _step_counts(model, batches: list[dict], dd) -> dict[str, torch.Tensor]:
    """Every loss term's target count over the whole step (this rank's micro-batches, all-reduced)."""
    total: dict[str, torch.Tensor] = {}
    for b in batches:
        c = model.loss_counts(**b)
        for k, v in c.items():
            total[k] = total[k] + v if k in total else v.clone()
    for k in sorted(total):
        total[k] = dd.all_sum(total[k].to(dd.device))
    return total


@torch.no_grad()
def run_eval(forward, loader: BatchLoader, plans, dd, autocast, nbytes) -> dict:
    """Mean next-token loss (nats/token) and bits per byte over the fixed validation windows, and the
    decision accuracy over the validation rows with a label; the plans are split across ranks."""
    model_was_training = forward.training
    forward.eval()
    nats = torch.zeros((), dtype=torch.float64, device=dd.device)
    stats = torch.zeros(4, dtype=torch.float64, device=dd.device)  # targets, bytes, labelled, correct
    for plan in plans[dd.rank::dd.world]:
        batch = _to(loader.load(plan), dd.device)
        with autocast():
            o = forward(**batch)
        tgt = batch["labels"][:, 1:]
        valid = tgt != -100
        n = valid.sum()
        if o.lm_loss is not None:
            nats += o.lm_loss.double() * n
        stats[0] += n
        stats[1] += nbytes[tgt[valid]].sum()
        if o.decision_logits is not None and "decision_labels" in batch:
            lab = batch["decision_labels"]
            has = lab != -100
            stats[2] += has.sum()
            stats[3] += (o.decision_logits.argmax(-1)[has] == lab[has]).sum()
    dd.all_sum(nats)
    dd.all_sum(stats)
    forward.train(model_was_training)
    row = {}
    if stats[0] > 0:
        loss = float(nats / stats[0])
        row.update(val_loss=loss, val_bpb=bits_per_byte(loss, int(stats[0]), int(stats[1])), val_tokens=int(stats[0]))
    if stats[2] > 0:
        row.update(val_decision_acc=float(stats[3] / stats[2]), val_decision_rows=int(stats[2]))
    return row


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _on_sigterm(stop: dict):
    """SIGTERM: finish the current step, save a checkpoint, stop. (Main thread only.)"""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        stop["signal"] = True

    return signal.signal(signal.SIGTERM, handler)


def _progress(enabled: bool, start: int, end: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=end, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
