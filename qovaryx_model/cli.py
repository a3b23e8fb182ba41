"""`qovaryx-train`: model initialisation/export (training arrives with the trainer issue).

Thin: each command parses its options and calls one library function (qovaryx_model.hf).
"""
from __future__ import annotations

import click

from .config import PRESETS


@click.group()
def main() -> None:
    """Create, export and (later) train Qovaryx models."""


@main.command("init")
@click.option("--preset", required=True, type=click.Choice(list(PRESETS)), help="model size (card shapes)")
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="tokenizer folder written by `qovaryx-data train-bpe`")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="new folder to write (must not exist or be empty)")
@click.option("--dtype", default="fp32", type=click.Choice(["fp32", "bf16", "fp16"]), show_default=True)
@click.option("--seed", default=0, show_default=True, type=int, help="torch seed for the random init")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="config override, e.g. --set ffn_kind=ternary_swiglu --set mtp_k=1 (repeatable)")
def init(preset: str, tokenizer_dir: str, out: str, dtype: str, seed: int, overrides: tuple[str, ...]) -> None:
    """Write a random-init scratch-base folder loadable with AutoModelForCausalLM (trust_remote_code=True)."""
    import json

    from .hf import _write_scratch_base

    kw = {}
    for item in overrides:
        if "=" not in item:
            raise click.BadParameter(f"{item!r}: expected FIELD=VALUE", param_hint="--set")
        key, value = item.split("=", 1)
        try:
            kw[key] = json.loads(value)
        except json.JSONDecodeError:
            kw[key] = value  # a bare string such as ternary_swiglu
    try:
        path, cfg, counts = _write_scratch_base(preset, tokenizer_dir, out, dtype=dtype, seed=seed, **kw)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {path} ({counts['total']:,} parameters, vocab {cfg.vocab_size}, {dtype})")


if __name__ == "__main__":
    main()
