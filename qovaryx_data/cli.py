"""`qovaryx-data`: a thin CLI. Each command parses its options and calls one typed library function.

Library modules are imported inside the commands so `qovaryx-data --help` stays fast and light.
"""
from __future__ import annotations

import sys

import click

from qovaryx_data.errors import QovaryxDataError


class _Group(click.Group):
    """Turns a user-caused QovaryxDataError into a one-line message and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QovaryxDataError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="qovaryx")
def main() -> None:
    """Train a byte-level BPE tokenizer and pack corpora into memory-mapped shards."""


# ---- train-bpe (qovaryx_data.tokenizer) ----

# ---- pack / verify / inspect (qovaryx_data.pack, qovaryx_data.reader) ----


if __name__ == "__main__":
    main()
