"""Launched by test_grad_scaling.py under `deepspeed --num_gpus 2`: ZeRO-3 over 2 ranks with different data,
a plain and a block-scaled (2^20) engine side by side; each rank dumps what it saw to OUT/rank{r}.json."""

import copy
import json
import math
import sys

import torch
from test_grad_scaling import _batches, _cfg, _engine, _full_params, _spy_partitions, _train

from dalle_ds.prior.model import Prior
from dalle_ds.training.grad_scaling import ScalingPolicy, scaler_for

out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
cfg = _cfg()
torch.manual_seed(0)
base = Prior(cfg.prior)
plain, scaled = _engine(copy.deepcopy(base), 3), _engine(copy.deepcopy(base), 3)
rank = torch.distributed.get_rank()
scaler = scaler_for(scaled, scaled.module, ScalingPolicy(mode="pow2", init_log2=20, min_log2=0, growth_interval=10**6))
name = "blocks.1.mlp_branch.fc.weight"
seen_p, seen_s = _spy_partitions(plain, [name]), _spy_partitions(scaled, [name])
batches = _batches(cfg, 4, seed=rank)  # each rank its own data: the reduce-scatter really averages
_train(plain, batches[:3])
_train(scaled, batches[:3], scaler=scaler)
a, b = _full_params(plain), _full_params(scaled)  # rank 0 only (None elsewhere)
same = None if a is None else all(torch.equal(a[k], b[k]) for k in a)
res = {
    "scaled_at_reduce": all(torch.equal(s, p * 2.0**20) for s, p in zip(seen_s[name], seen_p[name])),
    "n_partitions": len(seen_s[name]),
    "params_identical": same,
}
# an inf in element 0 of block 3's weight gradients, on rank 1 only: after the reduce-scatter it sits in
# rank 0's shards alone, and the all-reduced flags make both ranks skip and back off block 3 alone
local = []
flags = scaler.nonfinite_blocks
scaler.nonfinite_blocks = lambda: (local.append(scaler._param_bad.tolist()), flags())[1]
_train(scaled, batches[3:], inject={0: {3: ("param", math.inf)}} if rank == 1 else None, scaler=scaler)
c = _full_params(scaled)
res.update(
    local_bad=[i for i, v in enumerate(local[-1]) if v > 0],
    last_bad=scaler.last_bad,
    skipped=scaler.skipped,
    unchanged=None if b is None else all(torch.equal(b[k], c[k]) for k in b),
    scales_log2=[math.log2(s) for s in scaler.scales],
)
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(res, f)

from dalle_ds.training.distributed import end_process_distributed  # noqa: E402

end_process_distributed()  # a live gloo group at exit aborts a rank now and then
