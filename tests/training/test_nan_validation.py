"""Issue 17 item 4: a NaN validation loss stops the run with an error naming the step, instead of training on
and exporting a model that samples noise (exit 0)."""

import math

import pytest
import torch
from helpers import make_encoded_dataset, write_ds_config

from dalle_ds.cli.common import run_command
from dalle_ds.config import apply_overrides
from dalle_ds.errors import RunFailed
from dalle_ds.prior.train import train_prior
from dalle_ds.training.eval_guard import finite_eval


def test_diverged_prior_stops_at_the_first_nan_validation(tmp_path, tiny_cfg, one_thread):
    """lr=1e30 (a valid, finite number) throws the weights to ~1e30 in one Adam step; the validation after
    step 1 is NaN and the run stops there: no prior.pt is written."""
    data = make_encoded_dataset(tmp_path / "data", tiny_cfg, n_train=16, n_val=8)
    over = ["prior_train.lr=1e30", "prior_train.warmup_steps=0", "prior_train.steps=3", "prior_train.eval_every=1"]
    cfg = apply_overrides(tiny_cfg, over)
    with pytest.raises(RunFailed, match=r"prior: validation loss_text=nan.* at step 1;"):
        train_prior(
            cfg,
            ds_config=write_ds_config(tmp_path / "ds.json", micro=4, stage=0),
            data_dir=data,
            out_dir=tmp_path / "run",
            progress=False,
        )
    assert not (tmp_path / "run" / "prior.pt").exists()


def test_guard_checks_what_it_should(capsys):
    """NaN stops, +inf only where allowed (a perfect reconstruction's PSNR), nothing without validation data;
    at the CLI boundary RunFailed is one line and exit 1."""
    step = lambda: 7  # noqa: E731
    model = torch.nn.Linear(1, 1)
    assert finite_eval(lambda m: {"loss": 1.5}, step, "x")(model) == {"loss": 1.5}
    with pytest.raises(RunFailed, match="x: validation loss=nan at step 7"):
        finite_eval(lambda m: {"loss": math.nan}, step, "x")(model)
    with pytest.raises(RunFailed, match="loss=inf"):
        finite_eval(lambda m: {"loss": math.inf}, step, "x")(model)
    assert finite_eval(lambda m: {"psnr": math.inf}, step, "x", allow_inf=True)(model) == {"psnr": math.inf}
    assert math.isnan(finite_eval(lambda m: {"psnr": math.nan}, step, "x", has_data=lambda: False)(model)["psnr"])

    def fails(argv):
        finite_eval(lambda m: {"loss": math.nan}, step, "prior")(model)

    with pytest.raises(SystemExit) as e:
        run_command("train-prior", fails, [])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dalle-ds train-prior: prior: validation loss=nan at step 7")
