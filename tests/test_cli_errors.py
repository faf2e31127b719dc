"""Issue 17 items 4 and 5: every bad argument, config value or input file named here ends the command with
one line `dalle-ds COMMAND: ...` naming the argument or field, exit code 2 and no traceback (--debug shows
it); values that used to train quietly into a wrong result (steps=-5, text_len=0, a missing --hostfile) are
refused the same way."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, child_env

from dalle_ds.cli import main
from dalle_ds.config import ConfigError, load_config

GOOD = "a small red triangle at the top left"


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """Tiny model files (random weights, written by the real save functions) and bad input files."""
    from dalle_ds.dvae import DVAE
    from dalle_ds.dvae.io import save_dvae
    from dalle_ds.prior.io import save_prior
    from dalle_ds.prior.model import Prior
    from dalle_ds.tokenizer import CaptionTokenizer

    d = tmp_path_factory.mktemp("cli_errors")
    cfg = load_config("tiny")
    torch.manual_seed(0)
    dvae = DVAE(cfg.dvae)
    save_dvae(d / "dvae.pt", dvae.state_dict(), cfg, step=0)
    tok = CaptionTokenizer.train([GOOD, "a large blue circle at the bottom right"] * 8, cfg.tokenizer)
    save_prior(d / "prior.pt", Prior(cfg.prior).state_dict(), cfg, tok, step=0)
    (d / "prior_cut.pt").write_bytes((d / "prior.pt").read_bytes()[:2000])
    (d / "notes.txt").write_text("not a model\n")
    (d / "folder").mkdir()
    (d / "latin1.txt").write_bytes("a small café at the top left\n".encode("latin-1"))
    (d / "bad.yaml").write_text("prior:\n  d_model: [1, 2\n")
    (d / "list.yaml").write_text("- prior\n")
    (d / "micro0.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 0}))
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(d / "red.png")
    (d / "cut.png").write_bytes((d / "red.png").read_bytes()[:60])
    return d


TRAIN = ["train-prior", "--preset", "tiny", "--data", "{d}/folder", "--out", "{d}/run"]
SAMPLE = ["sample", "--prior", "{d}/prior.pt", "--dvae", "{d}/dvae.pt", "--caption", GOOD, "--out", "{d}/s.png"]
# (id, argv, text the one-line message must contain)
CASES = [
    ("d_model=0", [*TRAIN, "--set", "prior.d_model=0"], "prior.d_model"),
    ("d_model=-32", [*TRAIN, "--set", "prior.d_model=-32"], "prior.d_model"),
    ("lr=-1", [*TRAIN, "--set", "prior_train.lr=-1"], "prior_train.lr"),
    ("prior steps=-5", [*TRAIN, "--set", "prior_train.steps=-5"], "prior_train.steps"),
    ("prior steps=0", [*TRAIN, "--set", "prior_train.steps=0"], "prior_train.steps"),
    ("prior.text_len=0", [*TRAIN, "--set", "prior.text_len=0"], "prior.text_len"),
    ("tokenizer.text_len=0", [*TRAIN, "--set", "tokenizer.text_len=0", "--set", "prior.text_len=0"], "text_len"),
    ("unknown field", [*TRAIN, "--set", "prior.d_modle=64"], "prior.d_modle"),
    ("field type", [*TRAIN, "--set", "prior.d_model=big"], "prior.d_model"),
    ("unknown preset", ["train-prior", "--preset", "huge", "--data", "x", "--out", "y"], "preset"),
    ("yaml syntax", [*TRAIN, "--config", "{d}/bad.yaml"], "--config"),
    ("yaml not a mapping", [*TRAIN, "--config", "{d}/list.yaml"], "--config"),
    ("missing --config", [*TRAIN, "--config", "{d}/nope.yaml"], "--config"),
    ("micro batch 0", [*TRAIN, "--ds-config", "{d}/micro0.json"], "train_micro_batch_size_per_gpu"),
    ("missing --ds-config", [*TRAIN, "--ds-config", "{d}/nope.json"], "--ds-config"),
    ("--stop-at 0", [*TRAIN, "--stop-at", "0"], "--stop-at"),
    ("missing --data", [*TRAIN[:3], "--data", "{d}/nope", "--out", "{d}/run"], "--data"),
    ("--data is a file", [*TRAIN[:3], "--data", "{d}/notes.txt", "--out", "{d}/run"], "--data"),
    ("missing --tokenizer", [*TRAIN, "--tokenizer", "{d}/nope.json"], "--tokenizer"),
    ("dvae steps=0", ["train-dvae", "--preset", "tiny", "--out", "{d}/r", "--set", "dvae_train.steps=0"], "dvae_train"),
    ("dvae lr=0", ["train-dvae", "--preset", "tiny", "--out", "{d}/r", "--set", "dvae_train.lr=0"], "dvae_train.lr"),
    ("clip steps=0", ["train-clip", "--preset", "tiny", "--out", "{d}/r", "--set", "clip.steps=0"], "clip.steps"),
    ("non-UTF-8 --captions-file", [*SAMPLE, "--captions-file", "{d}/latin1.txt"], "--captions-file"),
    ("missing --captions-file", [*SAMPLE, "--captions-file", "{d}/nope.txt"], "--captions-file"),
    ("--n 0", [*SAMPLE, "--n", "0"], "--n"),
    ("--n -1", [*SAMPLE, "--n", "-1"], "--n"),
    ("bad --backend", [*SAMPLE, "--backend", "flash"], "--backend"),
    ("--prime-rows 99", [*SAMPLE, "--prime-image", "{d}/red.png", "--prime-rows", "99"], "--prime-rows"),
    ("truncated --prime-image", [*SAMPLE, "--prime-image", "{d}/cut.png"], "--prime-image"),
    ("missing --prime-image", [*SAMPLE, "--prime-image", "{d}/nope.png"], "--prime-image"),
    ("missing --prior", [*SAMPLE[:1], "--prior", "{d}/nope.pt", *SAMPLE[3:]], "--prior"),
    ("folder as --prior", [*SAMPLE[:1], "--prior", "{d}/folder", *SAMPLE[3:]], "--prior"),
    ("text file as --prior", [*SAMPLE[:1], "--prior", "{d}/notes.txt", *SAMPLE[3:]], "--prior"),
    ("truncated --prior", [*SAMPLE[:1], "--prior", "{d}/prior_cut.pt", *SAMPLE[3:]], "--prior"),
    ("dvae.pt as --prior", [*SAMPLE[:1], "--prior", "{d}/dvae.pt", *SAMPLE[3:]], "--prior"),
    ("prior.pt as --dvae", [*SAMPLE[:3], "--dvae", "{d}/prior.pt", *SAMPLE[5:]], "--dvae"),
    ("missing --dvae", [*SAMPLE[:3], "--dvae", "{d}/nope.pt", *SAMPLE[5:]], "--dvae"),
    ("encode, missing --dvae", ["encode", "--dvae", "{d}/nope.pt", "--out", "{d}/enc"], "--dvae"),
    ("encode, text file as --dvae", ["encode", "--dvae", "{d}/notes.txt", "--out", "{d}/enc"], "--dvae"),
    ("encode --batch 0", ["encode", "--dvae", "{d}/dvae.pt", "--out", "{d}/enc", "--batch", "0"], "--batch"),
    ("eval --n 0", ["eval", "--prior", "{d}/prior.pt", "--dvae", "{d}/dvae.pt", "--out", "{d}/e", "--n", "0"], "--n"),
    ("eval, missing --clip", ["eval", *SAMPLE[1:5], "--clip", "{d}/nope.pt", "--out", "{d}/e"], "--clip"),
    ("export, missing --run", ["export", "--run", "{d}/nope", "--out", "{d}/x"], "--run"),
]


def _argv(argv: list[str], d: Path) -> list[str]:
    return [a.format(d=d) for a in argv]


def _one_line(stderr: str, command: str, needle: str) -> str:
    """The single `dalle-ds COMMAND: ...` line of stderr, after checking there is no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("dalle-ds ")]
    assert len(lines) == 1 and lines[0].startswith(f"dalle-ds {command}: "), stderr
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_is_one_line_and_exit_2(d, capsys, argv, needle):
    """The real dispatcher (`dalle_ds.cli.main`, what `dalle-ds` and `python -m dalle_ds.cli` run), in process
    to keep 43 cases cheap; the subprocess tests below run the same code through the interpreter."""
    with pytest.raises(SystemExit) as e:
        main(_argv(argv, d))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    _one_line(err, argv[0], needle)


def test_debug_flag_raises_instead(d):
    """--debug (anywhere, or before the command) lets the exception through, with its traceback."""
    with pytest.raises(ConfigError, match="--n"):
        main(_argv([*SAMPLE, "--n", "0", "--debug"], d))
    with pytest.raises(ConfigError, match="prior_train.steps"):
        main(_argv(["--debug", *TRAIN, "--set", "prior_train.steps=-5"], d))


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=child_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_entry_points_in_a_fresh_interpreter(d):
    """`python -m dalle_ds.cli`, a command module run directly, and the launcher shim deepspeed runs
    (dalle_ds/train_prior.py) all print one line and exit 2; with --debug the traceback is shown (exit 1)."""
    py = sys.executable
    p = _run([py, "-m", "dalle_ds.cli", *_argv([*TRAIN, "--set", "prior_train.steps=-5"], d)])
    assert p.returncode == 2, p.stderr
    _one_line(p.stderr, "train-prior", "prior_train.steps: must be >= 1, got -5")
    p = _run([py, str(REPO / "dalle_ds/train_prior.py"), *_argv([*TRAIN[1:], "--set", "prior.text_len=0"], d)])
    assert p.returncode == 2, p.stderr
    _one_line(p.stderr, "train-prior", "prior.text_len")
    p = _run([py, "-m", "dalle_ds.cli.sample", *_argv([*SAMPLE[1:], "--n", "0", "--debug"], d)])
    assert p.returncode == 1 and "Traceback" in p.stderr and "ConfigError: --n" in p.stderr, p.stderr


def test_missing_hostfile_under_the_deepspeed_launcher(d, tmp_path):
    """`deepspeed --hostfile MISSING` only warns and trains on this machine (exit 0); the rank reads the
    launcher's arguments and refuses instead, so the launcher exits 2."""
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    args = _argv(TRAIN[1:], d)
    p = _run([launcher, "--hostfile", "nope/hostfile", "--num_gpus", "1", "--master_port", "29741",
              str(REPO / "dalle_ds/train_prior.py"), *args])  # fmt: skip
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    _one_line(p.stderr, "train-prior", "--hostfile: nope/hostfile does not exist")


def test_hostfile_is_read_from_the_runner_command_line():
    """The runner's command lines as /proc shows them (console script, `ds`, `python -m`), each spelling of the
    option, and no hostfile at all."""
    from dalle_ds.training.launcher import hostfile_arg, runner_args

    script = "dalle_ds/train_prior.py"
    for argv in (
        ["/venv/bin/python", "/venv/bin/deepspeed", "--hostfile", "hf", "--num_gpus", "1", script, "--out", "x"],
        ["/venv/bin/python", "/venv/bin/ds", "--hostfile=hf", script],
        ["python", "-m", "deepspeed.launcher.runner", "-H", "hf", script],
        ["/venv/bin/python", "/venv/bin/deepspeed", "-Hhf", script],
        ["/venv/bin/python", "/venv/bin/deepspeed", "--hostf", "hf", script],
    ):
        assert hostfile_arg(runner_args(argv), script) == "hf", argv
    plain = ["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2", script]
    assert hostfile_arg(runner_args(plain), script) is None
    assert hostfile_arg(runner_args(["deepspeed", script, "--hostfile", "ours"]), script) is None  # the script's own
    assert runner_args(["/venv/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"]) is None
