"""The trainer: `qovaryx-train train` / `train(...)` over packed datasets (docs/TRAINING.md).

    from qovaryx_model.trainer import train
    res = train("pipelines/recipes/debug.yaml", "build/packed/shakespeare", out="build/runs/debug")
    res.checkpoint   # loads with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)

Under torchrun the same arguments run DDP: `torchrun --nproc_per_node N -m qovaryx_model.trainer ...`.
A script that calls `train` under torchrun ends with `shutdown_distributed()` (the CLI does).
"""
from .loop import TrainResult, train
from .recipe import Recipe, RecipeError, TrainerError, load_recipe
from .setup import shutdown_distributed

__all__ = ["train", "TrainResult", "Recipe", "RecipeError", "TrainerError", "load_recipe", "shutdown_distributed"]
