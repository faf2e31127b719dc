"""Launched by tests under `deepspeed --num_gpus N`: train the tiny dVAE from a streamed folder and dump
rank 0's summary (loss curve, data report with every rank's stream state)."""

import json
import sys

from dalle_ds.config import load_config
from dalle_ds.dvae.train import train_dvae
from dalle_ds.training.distributed import is_main

folder, out, ds_config, steps = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
cfg = load_config(
    "tiny",
    overrides=[
        "data.dataset=folder",
        f"data.path={folder}",
        "data.streaming=true",
        "data.val_fraction=0.2",
        f"dvae_train.steps={steps}",
        "dvae_train.log_every=1",
    ],
)
summary = train_dvae(cfg, ds_config=ds_config, out_dir=out, progress=False)
if is_main():
    with open(f"{out}/summary.json", "w") as f:
        json.dump({"losses": [h["loss"] for h in summary["history"]], "data_report": summary["data_report"]}, f)

from dalle_ds.training.distributed import end_process_distributed  # noqa: E402

end_process_distributed()  # a live gloo group at exit aborts a rank now and then
