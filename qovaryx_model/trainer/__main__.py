"""`python -m qovaryx_model.trainer ...` (what torchrun runs): the arguments of `qovaryx-train train`."""
from ..cli import train_command

if __name__ == "__main__":
    train_command(prog_name="python -m qovaryx_model.trainer")
