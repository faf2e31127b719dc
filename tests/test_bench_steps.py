"""Per-preset step cost (dalle_ds/bench_steps.py, `dalle-ds bench steps`): the FLOP counts against hand formulas,
the same count on meta and on CPU tensors, the batch of every preset, and the CLI's table and JSON."""

import json

import pytest
import torch

from dalle_ds import bench_steps
from dalle_ds.cli import bench as bench_cli
from dalle_ds.config import PRESETS, PriorConfig, get_preset
from dalle_ds.dvae.model import Conv2d


def prior_hand_flops(p: PriorConfig, batch: int) -> int:
    """Forward + backward matmul FLOPs of the prior: every matmul is 2 FLOPs per multiply-add forward and twice that
    backward (input and weight gradients), so 6 x weights x tokens for the linear layers; attention is dense over
    the L x L scores, QK^T and PV forward (4 L^2 D per layer), four such matmuls backward."""
    T, N, D = p.text_len, p.image_len, p.d_model
    L = T + N  # BOS, T text tokens, N - 1 image tokens
    resblock_weights = p.n_layers * (4 + 2 * p.mlp_ratio) * D * D  # qkv 3D^2, proj D^2, MLP 2 r D^2
    linear = 6 * batch * L * resblock_weights
    attention = 12 * batch * L * L * D * p.n_layers
    # the head: text positions against the text ids (BPE + one pad per slot), image positions against image ids
    head = 6 * batch * D * (T * (p.text_vocab_size + T) + N * p.image_vocab_size)
    return linear + attention + head


def dvae_hand_flops(cfg, batch: int) -> int:
    """Forward + backward conv FLOPs of the dVAE from the shapes its convs see (forward hooks on a CPU run):
    2 B H W C_in C_out k^2 forward, twice that backward, except the first conv, whose input (pixels) needs no
    gradient."""
    model = bench_steps.build(cfg, "dvae")
    fwd = {}

    def hook(module, inputs, out):
        b, c_out, h, w = out.shape
        fwd[module] = 2 * b * h * w * module.n_in * c_out * module.kw**2

    for m in model.modules():
        if isinstance(m, Conv2d):
            m.register_forward_hook(hook)
    bench_steps.dvae_step(model, cfg, batch)()
    first = fwd[model.encoder.blocks.input]
    return 3 * sum(fwd.values()) - first


def test_prior_flops_match_the_hand_formula():
    """The prior's counted FLOPs at the tiny preset (and at a batch of 3) equal the hand formula exactly."""
    cfg = get_preset("tiny")
    for batch in (32, 3):
        flops, params = bench_steps.step_flops(cfg, "prior", batch)
        assert flops == prior_hand_flops(cfg.prior, batch)
    assert params == 60_652  # README's preset table


def test_dvae_flops_match_the_conv_shapes():
    """The dVAE's counted FLOPs at the tiny preset equal the sum over its convolutions' shapes."""
    cfg = get_preset("tiny")
    assert bench_steps.step_flops(cfg, "dvae", 5)[0] == dvae_hand_flops(cfg, 5)


@pytest.mark.parametrize("which", ["dvae", "prior"])
def test_count_is_the_same_on_meta_and_on_cpu(which):
    """Counting on meta (the math SDPA path: plain bmm) and on CPU tensors (the fused CPU attention kernel,
    counted through bench_steps.SDPA_FLOPS) gives the same number."""
    cfg = get_preset("tiny")
    meta, _ = bench_steps.step_flops(cfg, which, 4, device="meta")
    cpu, _ = bench_steps.step_flops(cfg, which, 4, device="cpu")
    assert meta == cpu > 0


def test_every_preset_has_a_batch():
    """Every preset is paired with ds_configs whose batch is read from the JSON: the paper's 1024 for 12b (4 x 2
    accumulation x 128 GPUs), gpu_zero2_bf16.json's 8 for real256_gpu, the demo's 32 for shapes."""
    for name in PRESETS:
        b = bench_steps.batches(name)
        assert b["dvae_batch"] >= 1 and b["prior_batch"] >= 1, name
    assert bench_steps.batches("12b")["prior_batch"] == 1024
    assert bench_steps.batches("real256_gpu")["prior_batch"] == 8
    assert bench_steps.batches("shapes")["dvae_batch"] == bench_steps.batches("shapes")["prior_batch"] == 32


def test_cli_writes_every_preset_and_does_not_time_12b(tmp_path, capsys):
    """`dalle-ds bench steps --preset tiny 12b --json F`: both presets in the JSON, tiny timed on CPU, 12b counted
    (the paper's batch 1024, its tied head) but not timed ("—" in the table, null in the JSON)."""
    out = tmp_path / "steps.json"
    threads = torch.get_num_threads()
    bench_cli.main(["steps", "--preset", "tiny", "12b", "--warmup", "0", "--repeats", "1", "--json", str(out)])
    assert torch.get_num_threads() == threads  # restored after the 1-thread timing
    text = capsys.readouterr().out
    rows = {r["preset"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["tiny", "12b"]
    tiny, big = rows["tiny"], rows["12b"]
    assert tiny["dvae_cpu_ms"] > 0 and tiny["prior_cpu_ms"] > 0
    assert big["dvae_cpu_ms"] is None and big["prior_cpu_ms"] is None
    assert big["prior_batch"] == 1024 and big["prior_flops"] == prior_hand_flops(get_preset("12b").prior, 1024)
    assert big["prior_gpu_ms"] == pytest.approx(big["prior_flops"] / bench_steps.GPU_SUSTAINED_FLOPS * 1e3)
    hours = (big["dvae_flops"] * 3_000_000 + big["prior_flops"] * 430_000) / bench_steps.GPU_SUSTAINED_FLOPS / 3600
    assert big["gpu_hours"] == pytest.approx(hours)
    line_12b = next(line for line in text.splitlines() if line.startswith("12b "))
    assert line_12b.count("—") == 2
