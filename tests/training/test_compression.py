"""PowerSGD and 1-bit compressors with error feedback, between 2 real gloo processes acting as 2 nodes."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from dalle_ds.training.compression import OneBit, PowerSGD, orthogonalise, pack_signs, unpack_signs


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, kind, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        comp = PowerSGD(4, fixed_q=True) if kind == "powersgd" else OneBit()
        g = torch.Generator().manual_seed(100 + rank)
        outs, true_sum = [], torch.zeros(64, 48)
        for t in range(6):
            grad = torch.randn(64, 48, generator=g)
            mean = grad.clone()
            dist.all_reduce(mean)
            true_sum += mean / world
            outs.append(comp.allreduce_mean("w", grad))
        err = comp.error["w"].clone()
        dist.all_reduce(err)
        state = comp.state_dict()
        nxt = comp.allreduce_mean("w", torch.ones(64, 48))
        comp2 = PowerSGD(4, fixed_q=True) if kind == "powersgd" else OneBit()
        comp2.load_state_dict(state)
        nxt2 = comp2.allreduce_mean("w", torch.ones(64, 48))
        # a rank-3 mean gradient is recovered by rank-4 PowerSGD with a fixed random Q
        low = None
        if kind == "powersgd":
            u = torch.randn(64, 3, generator=torch.Generator().manual_seed(7))
            v = torch.randn(3, 48, generator=torch.Generator().manual_seed(8 + rank))
            fresh = PowerSGD(4, fixed_q=True, wire_dtype=torch.float32)  # the algorithm, not the wire
            low_out = fresh.allreduce_mean("w", u @ v)
            target = u @ v
            dist.all_reduce(target)
            low = (low_out - target / world).abs().max().item()
        torch.save(
            {
                "outs": outs,
                "sum_out": sum(outs),
                "true_sum": true_sum,
                "mean_err": err / world,
                "nxt": nxt,
                "nxt2": nxt2,
                "bytes": comp.bytes_sent,
                "unc": comp.bytes_uncompressed,
                "low": low,
            },
            f"{out_dir}/r{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["powersgd", "onebit"])
def test_error_feedback_replicas_and_state(tmp_path, kind):
    """Both ranks get identical averages; Σ decompressed + mean error = Σ true means (error feedback loses
    nothing); the state dict resumes exactly; fewer bytes than fp32."""
    # Fresh interpreters: this pytest process may already hold a default process group from other tests.
    port = str(_port())
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), "2", port, kind, str(tmp_path)],
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        for r in (0, 1)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"r{i}.pt") for i in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0["outs"], r1["outs"]))
    assert torch.allclose(r0["sum_out"] + r0["mean_err"], r0["true_sum"], atol=1e-4)
    assert torch.equal(r0["nxt"], r0["nxt2"])
    ratio = r0["bytes"] / r0["unc"]
    print(f"\n{kind}: bytes sent / fp32 = {ratio:.4f}")
    assert ratio < (0.2 if kind == "powersgd" else 0.04)
    if kind == "powersgd":
        assert r0["low"] < 1e-3


def test_orthogonalise_is_stable_for_rank_deficient_16bit_input():
    p = torch.randn(32, 4).half()
    p[:, 2] = 0
    p[:, 3] = p[:, 1]
    q = orthogonalise(p)
    assert q.isfinite().all()
    assert torch.allclose(q.t() @ q, torch.eye(4), atol=1e-4)


def test_sign_packing_is_one_bit_per_element_and_round_trips():
    m = torch.randn(1001)
    m[3] = 0.0  # zero counts as non-negative
    packed = pack_signs(m)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert torch.equal(unpack_signs(packed, 1001), torch.where(m >= 0, 1.0, -1.0))


def test_batched_exchange_equals_one_tensor_at_a_time():
    """One process: exchanging several tensors in one call gives what separate calls give (1-bit exactly)."""
    g = torch.Generator().manual_seed(0)
    items = [
        ("a", torch.randn(8, 6, generator=g)),
        ("b", torch.randn(5, generator=g)),
        ("c", torch.randn(4, 4, generator=g)),
    ]
    one, many = OneBit(), OneBit()
    together = many.exchange(items)
    apart = [one.allreduce_mean(n, t) for n, t in items]
    assert all(torch.equal(x, y) for x, y in zip(together, apart))
    assert many.bytes_sent <= one.bytes_sent  # one packed buffer instead of one per tensor


if __name__ == "__main__":  # one rank of test_error_feedback_replicas_and_state
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
