"""`qovaryx-train`: model initialisation/export (`init`) and training (`train`).

Thin: each command parses its options and calls one library function (qovaryx_model.hf).
"""
from __future__ import annotations

import click

from .config import PRESETS


@click.group()
def main() -> None:
    """Create, export and train Qovaryx models."""


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


@click.command("train")
@click.option("--recipe", "recipe_path", required=True, type=click.Path(dir_okay=False),
              help="YAML recipe (pipelines/recipes/ has the card's)")
@click.option("--data", "data", multiple=True, metavar="DIR",
              help="packed dataset folder, or a pack output folder holding train/ (and val/); repeat to blend "
                   "equally, or give `data:` with weights in the recipe")
@click.option("--val-data", type=click.Path(file_okay=False), help="validation dataset (default: <data>/val)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run folder (metrics, checkpoints)")
@click.option("--max-steps", type=int, help="stop after this optimizer step (the schedule still spans target_tokens)")
@click.option("--resume", is_flag=True, help="continue from OUT/checkpoints/latest")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False),
              help="start from the weights of a `qovaryx-train init` folder or a checkpoint (new optimizer)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="recipe override (repeatable)")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def train_command(recipe_path, data, val_data, out, max_steps, resume, init_from, overrides, no_progress) -> None:
    """Train on packed datasets (runs DDP under torchrun)."""
    from .trainer import TrainerError, shutdown_distributed, train
    from .trainer.recipe import parse_overrides

    try:
        from qovaryx_data.errors import QovaryxDataError

        res = train(recipe_path, list(data) or None, out=out, val_data=val_data, max_steps=max_steps, resume=resume,
                    init_from=init_from, overrides=parse_overrides(overrides), progress=not no_progress)
    except (TrainerError, QovaryxDataError) as e:
        raise click.ClickException(str(e)) from None
    checkpoint = res.checkpoint
    del res  # the (FSDP) model holds the process group
    shutdown_distributed()
    click.echo(f"checkpoint: {checkpoint}")


main.add_command(train_command)

if __name__ == "__main__":
    main()
