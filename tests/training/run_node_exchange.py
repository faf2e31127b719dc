"""Launched by tests under `deepspeed --num_gpus N`: train the tiny prior once per compressor (one process group,
one engine after another) and dump rank 0's loss curve and last logged metrics per run.

    run_node_exchange.py DATA OUT DS_CONFIG STEPS KINDS [section.field=value ...]

KINDS is comma-separated (none first: DeepSpeed keeps the last `mpu` it was given in a module global).
"""

import json
import sys

from dalle_ds.config import load_config
from dalle_ds.prior.train import train_prior
from dalle_ds.training.distributed import is_main

data, out, ds_config, steps, kinds, *extra = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
for kind in kinds.split(","):
    cfg = load_config(
        "tiny",
        overrides=[
            "tokenizer.bpe_dropout=0",
            "prior_train.log_every=1",
            f"prior_train.steps={steps}",
            "prior_train.save_every=1000",
            "prior_train.eval_every=0",
            f"prior_train.compression={kind}",
            *extra,
        ],
    )
    summary = train_prior(cfg, ds_config=ds_config, data_dir=data, out_dir=f"{out}/{kind}", progress=False)
    if is_main():
        with open(f"{out}/{kind}/summary.json", "w") as f:
            json.dump(
                {
                    "losses": [h["loss"] for h in summary["history"]],
                    "last": summary["history"][-1],
                    "seconds": summary["seconds"],
                },
                f,
            )

from dalle_ds.training.distributed import end_process_distributed  # noqa: E402

end_process_distributed()  # a live gloo group at exit aborts a rank now and then
