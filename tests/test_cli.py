"""The `dalle-ds` command line."""

import subprocess
import sys

import numpy as np

from dalle_ds.attention.masks import MaskSpec, dense_mask


def run(*args):
    return subprocess.run([sys.executable, "-m", "dalle_ds.cli", *args], capture_output=True, text=True, timeout=300)


def test_masks_command_writes_the_models_matrix(tmp_path):
    """`dalle-ds masks` writes the exact (T+G², T+G²) matrix the model uses, and a picture of it."""
    proc = run(
        "masks",
        "--kind",
        "conv",
        "--text-len",
        "7",
        "--grid",
        "5",
        "--kernel",
        "3",
        "--npy",
        str(tmp_path / "m.npy"),
        "--png",
        str(tmp_path / "m.png"),
    )
    assert proc.returncode == 0, proc.stderr
    m = np.load(tmp_path / "m.npy")
    assert m.shape == (32, 32) and m.dtype == bool
    assert np.array_equal(m, dense_mask(MaskSpec("conv", 7, 5, 3)).numpy())
    assert (tmp_path / "m.png").stat().st_size > 0


def test_bad_config_on_the_command_line_is_a_clear_error(tmp_path):
    """A typo in an override stops the run before any work, naming the field and exit code 2."""
    proc = run(
        "train-prior",
        "--preset",
        "tiny",
        "--set",
        "prior.n_head=3",
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2
    assert "prior.n_head: unknown field (did you mean prior.n_heads?)" in proc.stderr


def test_help_lists_subcommands():
    proc = run("--help")
    assert proc.returncode == 0
    for cmd in ("train-dvae", "encode", "train-prior", "sample", "demo", "masks"):
        assert cmd in proc.stdout
