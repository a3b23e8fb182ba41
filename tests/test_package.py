"""The package's public names and console scripts."""
from __future__ import annotations

import subprocess
import sys

import qovaryx_data


def test_public_names_are_the_functions_even_after_every_submodule_is_imported():
    import qovaryx_data.hf  # noqa: F401  (imports of submodules must not shadow exported names)
    import qovaryx_data.packer  # noqa: F401
    import qovaryx_data.reader  # noqa: F401
    import qovaryx_data.tokenizer  # noqa: F401
    from qovaryx_data import PackedDataset, pack, pack_dataset, train_bpe, verify

    for f in (pack, pack_dataset, train_bpe, verify):
        assert callable(f) and not isinstance(f, type(qovaryx_data)), f
    assert isinstance(PackedDataset, type)
    for name in qovaryx_data.__all__:
        assert getattr(qovaryx_data, name) is not None


def test_cli_help_starts_without_heavy_imports():
    code = ("import sys; from click.testing import CliRunner; from qovaryx_data.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'pyarrow', 'numpy') if m in sys.modules]; "
            "print(r.output); assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for cmd in ("train-bpe", "pack", "verify", "inspect"):
        assert cmd in out.stdout
