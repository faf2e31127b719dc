"""Launched by tests under `deepspeed --num_gpus N`: train the tiny prior and dump rank 0's loss curve."""

import json
import sys

from dalle_ds.config import load_config
from dalle_ds.prior.train import train_prior
from dalle_ds.training.distributed import is_main

data, out, ds_config, steps, *extra = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
cfg = load_config(
    "tiny",
    overrides=[
        "tokenizer.bpe_dropout=0",
        "prior_train.log_every=1",
        f"prior_train.steps={steps}",
        "prior_train.save_every=1000",
        *extra,
    ],
)
summary = train_prior(cfg, ds_config=ds_config, data_dir=data, out_dir=out, progress=False)
if is_main():
    with open(f"{out}/losses.json", "w") as f:
        json.dump([h["loss"] for h in summary["history"]], f)

from dalle_ds.training.distributed import end_process_distributed  # noqa: E402

end_process_distributed()  # a live gloo group at exit aborts a rank now and then
