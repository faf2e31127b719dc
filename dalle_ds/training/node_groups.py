"""Nodes as process groups: ZeRO-3 shards within a node, gradients cross nodes compressed (PAPER §5).

Ranks are numbered node by node (the `deepspeed` launcher and torchrun do this), so with R ranks per node,
node k holds global ranks [k·R, (k+1)·R). Two families of groups:

  * intra (one per node): ZeRO-3's data-parallel group. DeepSpeed 0.19 takes it through the `mpu`
    argument of `deepspeed.initialize` (`NodeMPU` below), and then partitions parameters, gradients and
    optimizer state over this group only, so every node holds a full replica of the model in R shards.
  * inter (one per local rank): the ranks of different nodes that hold the same shard. The compressor
    exchanges gradient shards over these (`training/node_exchange.py`).

R comes from the launcher (`LOCAL_SIZE` from `deepspeed`, `LOCAL_WORLD_SIZE` from torchrun) and can be
overridden (`prior_train.ranks_per_node`) so that one machine simulates several nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from dalle_ds.config import ConfigError


def launcher_ranks_per_node() -> int | None:
    """Ranks per node as the launcher set it, or None when it did not say."""
    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):  # deepspeed launcher, torchrun
        if os.environ.get(key, "").isdigit() and int(os.environ[key]) > 0:
            return int(os.environ[key])
    return None


def resolve_ranks_per_node(override: int, world: int) -> int:
    """`override` if > 0, else the launcher's value, else one node of `world` ranks; must divide `world`."""
    if override < 0:
        raise ConfigError(f"prior_train.ranks_per_node: must be >= 0 (0 = from the launcher), got {override}")
    r = override or launcher_ranks_per_node() or world
    if world % r != 0:
        raise ConfigError(
            f"prior_train.ranks_per_node: {r} ranks per node do not divide the world of {world} "
            "ranks; every node must run the same number of ranks"
        )
    return r


@dataclass
class NodeGroups:
    ranks_per_node: int
    num_nodes: int
    node: int  # this rank's node index
    local: int  # this rank's index within its node (= its ZeRO-3 shard index)
    intra: object  # process group: my node's ranks
    inter: object  # process group: my local rank on every node
    single: object  # process group: just me (DeepSpeed's model-parallel group of size 1)

    def intra_ranks(self) -> list[int]:
        return list(range(self.node * self.ranks_per_node, (self.node + 1) * self.ranks_per_node))


_CACHE: dict[int, NodeGroups] = {}


def node_groups(ranks_per_node: int) -> NodeGroups:
    """Create (once per process and size) the intra-node, inter-node and single-rank groups. Collective:
    every rank calls `new_group` for every group in the same order."""
    if ranks_per_node in _CACHE:
        return _CACHE[ranks_per_node]
    world, me = dist.get_world_size(), dist.get_rank()
    r = ranks_per_node
    n = world // r
    intra = inter = single = None
    for k in range(n):
        g = dist.new_group(list(range(k * r, (k + 1) * r)))
        if me // r == k:
            intra = g
    for j in range(r):
        g = dist.new_group([k * r + j for k in range(n)])
        if me % r == j:
            inter = g
    for q in range(world):
        g = dist.new_group([q])
        if q == me:
            single = g
    _CACHE[r] = NodeGroups(
        ranks_per_node=r, num_nodes=n, node=me // r, local=me % r, intra=intra, inter=inter, single=single
    )
    return _CACHE[r]


class NodeMPU:
    """The `mpu` interface DeepSpeed 0.19 queries (deepspeed/utils/groups.py, bwc.py, zero/stage3.py): data
    parallelism = my node; no tensor, pipeline or sequence parallelism (model-parallel group = just me)."""

    def __init__(self, groups: NodeGroups):
        self.g = groups

    def get_data_parallel_group(self):
        return self.g.intra

    def get_data_parallel_world_size(self) -> int:
        return self.g.ranks_per_node

    def get_data_parallel_rank(self) -> int:
        return self.g.local

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.g.intra_ranks()

    def get_model_parallel_group(self):
        return self.g.single

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1
