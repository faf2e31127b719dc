"""Launched by tests under `deepspeed --num_gpus N`: the tiny prior with everything on, trained straight through
and, in the same processes, cut at STEPS/2 and resumed from its checkpoint. Dumps rank 0's loss curves.

    run_all_features.py DATA OUT DS_CONFIG STEPS [section.field=value ...]
"""

import json
import sys

import torch

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
        "prior_train.eval_every=0",
        *extra,
    ],
)
full = train_prior(cfg, ds_config=ds_config, data_dir=data, out_dir=f"{out}/full", progress=False)
first = train_prior(
    cfg, ds_config=ds_config, data_dir=data, out_dir=f"{out}/cut", progress=False, stop_at=int(steps) // 2
)
torch.manual_seed(12345)  # disturb the RNG: the checkpoint must restore everything
rest = train_prior(cfg, ds_config=ds_config, data_dir=data, out_dir=f"{out}/cut", progress=False)
if is_main():
    with open(f"{out}/summary.json", "w") as f:
        json.dump({"full": full["history"], "first": first["history"], "rest": rest["history"]}, f)

from dalle_ds.training.distributed import end_process_distributed  # noqa: E402

end_process_distributed()  # a live gloo group at exit aborts a rank now and then
