"""transformers integration: Auto registration, self-contained export, the scratch-base folder,
and the packed ternary weight file.

An exported folder holds config.json (with `auto_map`), model.safetensors, generation_config.json,
the modeling source (config.py, model.py, attention.py, ffn.py, heads.py), tokenizer files and README.md, and
loads with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` where qovaryx is not
installed. Weights are safetensors only; nothing here unpickles.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig

from .config import QovaryxConfig
from .ffn import BitLinear, pack_ternary, unpack_ternary
from .model import QovaryxForCausalLM, QovaryxModel, parameter_counts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TERNARY_FORMAT, TERNARY_VERSION = "qovaryx-ternary-packed", "1"

# Default sampling parameters written to generation_config.json (random-init model: just sensible defaults).
DEFAULT_SAMPLING = dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=50, max_new_tokens=256,
                        repetition_penalty=1.0)


def register() -> None:
    """Register with the Auto classes and mark the classes so save_pretrained writes `auto_map` + source."""
    AutoConfig.register(QovaryxConfig.model_type, QovaryxConfig, exist_ok=True)
    AutoModel.register(QovaryxConfig, QovaryxModel, exist_ok=True)
    AutoModelForCausalLM.register(QovaryxConfig, QovaryxForCausalLM, exist_ok=True)
    QovaryxConfig.register_for_auto_class("AutoConfig")
    QovaryxModel.register_for_auto_class("AutoModel")
    QovaryxForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def load_hf_tokenizer(path: str | os.PathLike):
    """A local tokenizer folder (tokenizer.json [+ tokenizer_config.json]) as a fast HF tokenizer
    (`qovaryx_data.load_tokenizer` gives the `tokenizers.Tokenizer` of the same folder)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json; pass the folder `qovaryx-data train-bpe` wrote")
    if (path / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))


def _atomic_dir(out: Path):
    """A temp folder beside `out`; call `commit()` to move it into place (refuses a non-empty `out`)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))

    def commit():
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)

    return tmp, commit


def export_pretrained(model: QovaryxForCausalLM, out: str | os.PathLike, tokenizer=None,
                      generation: dict | None = None, readme: str | None = None) -> Path:
    """Write a self-contained, loadable folder (atomically: a temp folder renamed into place).

    `tokenizer` is a tokenizer object (saved with save_pretrained) or a tokenizer folder, whose files
    are copied byte for byte (so train-bpe's own metadata, e.g. its content hash, travels along);
    files the model export writes itself (config.json, ...) are never overwritten by it.
    `generation` overrides the folder's sampling defaults; the live model's generation_config is
    left as it is.
    """
    out = Path(out)
    tmp, commit = _atomic_dir(out)
    try:
        cfg = model.config
        ids = dict(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
        sampling = GenerationConfig(**{**DEFAULT_SAMPLING, **(generation or {}), **ids})
        model.save_pretrained(tmp)  # safetensors + config.json (auto_map) + modeling source + generation_config
        sampling.save_pretrained(tmp)  # replaces the model's own generation_config.json
        if isinstance(tokenizer, (str, os.PathLike)):  # a tokenizer folder: copy its files as they are
            for f in sorted(Path(tokenizer).iterdir()):
                if f.is_file() and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(readme if readme is not None else model_card(cfg), encoding="utf-8")
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def init_scratch_base(preset: str, tokenizer_dir: str | os.PathLike, out: str | os.PathLike,
                      dtype: str = "fp32", seed: int = 0, **overrides) -> Path:
    """`qovaryx-train init`: a random-init model of `preset` sized to the tokenizer, exported to `out`."""
    return _write_scratch_base(preset, tokenizer_dir, out, dtype, seed, **overrides)[0]


def _write_scratch_base(preset, tokenizer_dir, out, dtype="fp32", seed=0,
                        **overrides) -> tuple[Path, QovaryxConfig, dict[str, int]]:
    """`init_scratch_base`, also returning the config and its `parameter_counts` (for the CLI's summary)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    tok = load_hf_tokenizer(tokenizer_dir)
    special = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(tok, k) is not None}
    cfg = QovaryxConfig.from_preset(preset, vocab_size=len(tok), **special, **overrides)
    torch.manual_seed(seed)
    model = QovaryxForCausalLM(cfg).to(DTYPES[dtype])
    counts = parameter_counts(cfg)
    readme = model_card(cfg, preset=preset, dtype=dtype, counts=counts)
    return export_pretrained(model, out, tokenizer=tokenizer_dir, readme=readme), cfg, counts


def model_card(cfg: QovaryxConfig, preset: str | None = None, dtype: str | None = None,
               counts: dict[str, int] | None = None) -> str:
    """README.md of an exported folder; `counts` is `parameter_counts(cfg)` when the caller has it."""
    counts = counts if counts is not None else parameter_counts(cfg)
    name = f"qovaryx-{preset}-scratch-base" if preset else "qovaryx"
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [from-scratch, random-init, scratch-base, causal-lm, gqa, mtp, swiglu]
---
# {name} (random init)

**Not trained: this model emits noise.** It is the random-init starting point written by
`qovaryx-train init`{f" (preset `{preset}`, dtype {dtype})" if preset else ""}.

| field | value |
|---|---|
| parameters | {counts['total']:,} (trunk {counts['trunk_blocks']:,}, embedding {counts['embedding']:,}, head {counts['lm_head']:,}, MTP {counts['mtp_modules']:,}) |
| d_model / n_layer / n_head / n_kv_head / d_ff | {cfg.d_model} / {cfg.n_layer} / {cfg.n_head} / {cfg.n_kv_head} / {cfg.d_ff} |
| vocab | {cfg.vocab_size} |
| ffn_kind | {cfg.ffn_kind} |
| mtp_k | {cfg.mtp_k} (main head + {cfg.mtp_k - 1} MTP depths; `generate` uses the main head) |
| tie_embeddings | {cfg.tie_embeddings} |
| decision head / chart-patch encoder | {cfg.decision_head_enabled} / {cfg.chart_patch_encoder_enabled} |

Initialization: Xavier/Glorot uniform for Linear and Conv2d, Xavier normal for the embedding,
norms at 1, biases at 0.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)  # transformers 5 reads config.json here too
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
out = model(**tok("hello", return_tensors="pt"), labels=tok("hello", return_tensors="pt").input_ids)
print(out.loss, out.lm_loss, out.mtp_loss)
```

License: Apache-2.0.
"""


# ---------------------------------------------------------------------------------------------
# packed ternary weights
# ---------------------------------------------------------------------------------------------
def export_ternary_packed(model: QovaryxForCausalLM, path: str | os.PathLike) -> Path:
    """Write every BitLinear weight as 2-bit codes + scale, other tensors as they are (safetensors).

    For a ternary weight `name` (e.g. `model.layers.0.mlp.up_proj.weight`):
      `name.packed` uint8 (ceil(numel / 4),) codes, see ffn.pack_ternary for the bit layout;
      `name.scale` float32 (1,) the per-tensor gamma = mean|W|; `name.shape` int64 (ndim,).
    W_q = unpack(name.packed, name.shape) * name.scale reproduces the forward's weight exactly.
    A tied output head is stored once, under the embedding's name.
    Metadata: format, format_version, and the model config as JSON. `load_ternary_model` reads it back.
    """
    path = Path(path)
    ternary = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, BitLinear)}
    tensors, seen = {}, set()
    for name, p in model.state_dict().items():
        if name in ternary:
            codes, gamma = ternary[name].ternary()  # the forward's own codes and scale, in the weight's dtype
            tensors[f"{name}.packed"] = pack_ternary(codes)
            tensors[f"{name}.scale"] = gamma.detach().reshape(1).float()
            tensors[f"{name}.shape"] = torch.tensor(p.shape, dtype=torch.int64)
        elif p.data_ptr() not in seen or p.numel() == 0:  # a tied head shares the embedding's memory
            tensors[name] = p.detach().contiguous()
        seen.add(p.data_ptr())
    meta = {"format": TERNARY_FORMAT, "format_version": TERNARY_VERSION,
            "config": model.config.to_json_string(use_diff=False)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def _read_ternary(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != TERNARY_FORMAT or meta.get("format_version") != TERNARY_VERSION:
            raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                             f"expected {TERNARY_FORMAT!r} version {TERNARY_VERSION!r}")
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def _ternary_parts(raw: dict[str, torch.Tensor]):
    """(plain tensors, {weight name: (codes float32, scale float32 (1,))}) of a packed file."""
    plain, ternary = {}, {}
    for k, v in raw.items():
        if k.endswith(".packed"):
            base = k[: -len(".packed")]
            ternary[base] = (unpack_ternary(v, tuple(raw[base + ".shape"].tolist())), raw[base + ".scale"])
        elif not k.endswith((".scale", ".shape")):
            plain[k] = v
    return plain, ternary


def load_ternary_packed(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a packed ternary file back into a state dict with dequantized ternary weights (W_q).

    Loading it into a fresh model does NOT give the exported model (BitLinear would recompute its
    scale from W_q); use `load_ternary_model` for that."""
    plain, ternary = _ternary_parts(_read_ternary(path)[0])
    return {**plain, **{k: codes * scale for k, (codes, scale) in ternary.items()}}


def load_ternary_model(path: str | os.PathLike) -> QovaryxForCausalLM:
    """The model a packed ternary file was exported from: every BitLinear gets its codes as `weight`
    and its scale as `weight_scale`, so its forward weight is the exported W_q bit for bit; the other
    tensors load as written (a tied head is re-tied). For inference and re-export with
    `export_ternary_packed`; `save_pretrained` refuses it (train from the float checkpoint)."""
    raw, meta = _read_ternary(path)
    cfg = QovaryxConfig.from_dict(json.loads(meta["config"]))
    plain, ternary = _ternary_parts(raw)
    floats = [v.dtype for v in plain.values() if v.is_floating_point()]
    dtype = floats[0] if floats else torch.float32
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = QovaryxForCausalLM(cfg)
    state = {**plain, **{k: codes.to(dtype) for k, (codes, _) in ternary.items()}}
    if cfg.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    expected = set(model.state_dict())
    if set(state) != expected:
        raise ValueError(f"{path}: tensors do not match the config's model: missing {sorted(expected - set(state))}, "
                         f"unexpected {sorted(set(state) - expected)}")
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    modules = dict(model.named_modules())
    for name, (_, scale) in ternary.items():
        mod = modules[name[: -len(".weight")]]
        assert isinstance(mod, BitLinear), name
        mod.weight_scale = scale.to(dtype)
    return model
