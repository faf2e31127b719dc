"""Launched by test_checkpoint_trust.py under `deepspeed --num_gpus 2` (with ZeRO-3 every rank writes its own shards).

In one launch: an uninterrupted run of 6 steps; a run stopped at step 4 (checkpoints at 2 and 4); then for each
damage named on the command line, a copy of the stopped run whose step-4 checkpoint gets that damage, resumed to
step 6. Rank 0 writes OUT/result.json: the uninterrupted curve, each resumed curve, and whether each resumed
run's final weights (and EMA weights) equal the uninterrupted run's.
"""

import json
import shutil
import sys
from pathlib import Path

import torch

from dalle_ds.config import load_config
from dalle_ds.prior.train import train_prior
from dalle_ds.training.distributed import barrier, is_main

data, out, ds, *damages = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
out = Path(out)
cfg = load_config(
    "tiny",
    overrides=[
        "tokenizer.bpe_dropout=0",
        "prior_train.log_every=1",
        "prior_train.steps=6",
        "prior_train.save_every=2",
        "prior_train.eval_every=0",
        "prior.dropout=0.1",
        "prior_train.ema_decay=0.9",
    ],
)


def run(where, stop_at=None):
    return train_prior(cfg, ds_config=ds, data_dir=data, out_dir=out / where, progress=False, stop_at=stop_at)


DAMAGE = {  # what a crash, a bad disk or a careless copy leaves behind, in rank 1's files and in shared ones
    "truncate_rank1_shard": (
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        lambda p: p.write_bytes(p.read_bytes()[:100]),
    ),
    "truncate_rank1_state": ("rank_state_00001.pt", lambda p: p.write_bytes(p.read_bytes()[:-1])),
    "garble_rank0_model": ("zero_pp_rank_0_mp_rank_00_model_states.pt", lambda p: p.write_bytes(_flip(p.read_bytes()))),
    "delete_rank1_state": ("rank_state_00001.pt", lambda p: p.unlink()),
}


def _flip(b: bytes) -> bytes:
    i = len(b) // 2
    return b[:i] + bytes([b[i] ^ 0xFF]) + b[i + 1 :]


full = run("full")
run("cut", stop_at=4)
result = {"full": [h["loss"] for h in full["history"]], "resumed": {}, "same_weights": {}}
for name in damages:
    if is_main():
        shutil.copytree(out / "cut", out / name)
        file, damage = DAMAGE[name]
        damage(out / name / "checkpoints" / "step00000004" / file)
    barrier()
    resumed = run(name)
    result["resumed"][name] = [h["loss"] for h in resumed["history"]]
    if is_main():
        a, b = torch.load(out / "full" / "prior.pt"), torch.load(out / name / "prior.pt")
        result["same_weights"][name] = all(
            torch.equal(a[k][n], b[k][n]) for k in ("state_dict", "ema_state_dict") for n in a[k]
        )
if is_main():
    (out / "result.json").write_text(json.dumps(result))

from dalle_ds.training.distributed import end_process_distributed  # noqa: E402

end_process_distributed()  # a live gloo group at exit aborts a rank now and then
