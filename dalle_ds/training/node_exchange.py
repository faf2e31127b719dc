"""Compressed gradient exchange between nodes under a ZeRO-3 engine (PAPER §5), as a stage of the step pipeline.

Within a node, ZeRO-3 (whose data-parallel group is the node, see node_groups.py) reduce-scatters the
gradients: local rank j ends backward holding shard j of the node's mean gradient. Before the optimizer
step, this wrapper averages shard j with shard j of every other node through the compressor, over the
inter-node group of local rank j, and writes the result back into the local shard
(`deepspeed.utils.safe_get_local_grad`/`safe_set_local_grad`, as grad_scaling.py reaches them). Then
DeepSpeed's own step clips and updates the shard. Every node therefore applies the identical global-mean
gradient to identical shards, so the replicas stay bit-identical (the compressors return identical
results on every rank; see compression.py).

A shard is a contiguous slice of the row-major flattened weight. For PowerSGD it is viewed as a matrix
with the weight's row length: when ZeRO's shard size is a multiple of the row length (the usual case)
its rows are whole rows of the weight and the gradient's low-rank structure survives; otherwise it is
zero-padded to whole rows (error feedback keeps what the shape costs). Only matrices inside the resblocks
are compressed; embeddings, gains, biases and the output head go uncompressed in fp32 (PAPER §5.4).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dalle_ds.training.compression import Compressor
from dalle_ds.training.distributed import device
from dalle_ds.training.node_groups import NodeGroups
from dalle_ds.training.step_pipeline import StepContext


def prior_compressible(name: str, param: torch.nn.Parameter) -> bool:
    """Resblock matrices only (PAPER §5.4: embeddings, gains and biases travel uncompressed; so does the head)."""
    return name.startswith("blocks.") and len(getattr(param, "ds_shape", param.shape)) >= 2


class NodeExchange:
    """Owns the compressor and the per-parameter shard views; checkpointable (`state_dict`) and loggable
    (`stats`, collective)."""

    def __init__(self, engine, groups: NodeGroups, compressor: Compressor, compressible=prior_compressible):
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad  # noqa: PLC0415

        stage = int(engine.zero_optimization_stage()) if engine.zero_optimization() else 0
        if stage != 3:
            raise ValueError(
                f"compressed exchange between nodes works on ZeRO-3 gradient shards; the ds_config "
                f"has ZeRO stage {stage}: use a stage 3 config (e.g. ds_configs/cpu_zero3_fp32.json)"
            )
        self._get, self._set = safe_get_local_grad, safe_set_local_grad
        self.engine, self.groups, self.compressor = engine, groups, compressor
        self.params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        self.compress = {n: compressible(n, p) for n, p in self.params}
        self.steps = 0
        if not self.replicas_identical():  # every node must build the model from the same seed
            raise RuntimeError("node replicas start from different parameters; seed every rank the same")

    @torch.no_grad()
    def replicas_identical(self) -> bool:
        """Whether my shards equal the same shards on every other node (fp64 sum and sum of squares of
        each shard, compared exactly). Collective over all ranks."""
        local = torch.stack(
            [torch.stack([p.ds_tensor.double().sum(), p.ds_tensor.double().square().sum()]) for _, p in self.params]
        ).reshape(-1)
        ok = torch.ones(1, dtype=torch.float64, device=local.device)
        if self.groups.num_nodes > 1:
            parts = [torch.empty_like(local) for _ in range(self.groups.num_nodes)]
            dist.all_gather(parts, local, group=self.groups.inter)
            ok[0] = float(all(torch.equal(parts[0], q) for q in parts[1:]))
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() == 1.0)

    def _view(self, name: str, p, shard: torch.Tensor) -> torch.Tensor:
        if not self.compress[name]:
            return shard
        cols = int(p.ds_shape[-1])
        return torch.nn.functional.pad(shard, (0, (-shard.numel()) % cols)).view(-1, cols)

    @torch.no_grad()
    def exchange(self) -> None:
        """Replace every local gradient shard by its (compressed) mean over the nodes."""
        items, live = [], []
        for name, p in self.params:
            g = self._get(p)
            if g is None:
                continue
            items.append((name, self._view(name, p, g.float())))
            live.append((p, g.numel(), g.dtype))
        means = self.compressor.exchange(items, self.groups.inter)
        for (p, n, dtype), mean in zip(live, means):
            self._set(p, mean.reshape(-1)[:n].to(dtype))
        self.steps += 1

    def stats(self) -> dict[str, float]:
        """Bytes that crossed node boundaries so far, summed over all ranks, and the ratio to fp32. Collective."""
        t = torch.tensor(
            [float(self.compressor.bytes_sent), float(self.compressor.bytes_uncompressed)],
            dtype=torch.float64,
            device=device(),
        )
        if dist.is_initialized():
            dist.all_reduce(t)
        sent, unc = t.tolist()
        return {
            "comm/bytes_between_nodes": sent,
            "comm/bytes_fp32": unc,
            "comm/ratio": sent / unc if unc else 0.0,
            "comm/replicas_identical": float(self.replicas_identical()),
        }

    def state_dict(self) -> dict:
        return {"compressor": self.compressor.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.compressor.load_state_dict(state["compressor"])
        self.steps = int(state["steps"])

    # -- a stage of the engine's StepPipeline, after gradient scaling (order 0): the exchange and its error
    # buffers see unscaled gradients (PAPER §5.4), and a skipped step exchanges nothing

    order = 10

    def before_step(self, engine, ctx: StepContext) -> None:
        if not ctx.skip:
            self.exchange()

    def after_step(self, engine, ctx: StepContext) -> None:
        pass
