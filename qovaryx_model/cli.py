"""`qovaryx-train`: model initialisation/export (training arrives with the trainer issue)."""
from __future__ import annotations

import click


@click.group()
def main() -> None:
    """Create, export and (later) train Qovaryx models."""


if __name__ == "__main__":
    main()
