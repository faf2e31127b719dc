"""`make gpu-check` (dalle_ds/gpu_check.py, training/short_run.py): the parts that run without a GPU. The
training runs' step loop runs here for 3 steps of the tiny prior (fp32: DeepSpeed refuses fp16 on CPU); the
report is assembled from them; the command refuses with one line when no GPU is visible."""

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import REPO, child_env

from dalle_ds.gpu_check import assemble, finite_json, plan_phases, vs_references
from dalle_ds.training.short_run import RUNS, run_ds_config, short_run, synthetic_tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_refuses_without_a_gpu(tmp_path):
    """One line on stderr naming the reason, exit code 2, no JSON written."""
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dalle_ds.cli.gpu_check", "--json", str(out)],
        env=child_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.startswith("dalle-ds gpu-check:")]
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def test_phases_by_capability():
    """A V100 skips Triton, Flex and the bf16 run (with reasons) and times in fp16; an H100 runs everything."""
    v100, h100 = plan_phases((7, 0), RUNS), plan_phases((9, 0), RUNS)
    assert "sm70" in v100["triton"] and v100["flex"] and v100["dtype"] == "float16"
    assert dict((s.name, why) for s, why in v100["runs"]) == {
        "bf16_zero2": "bf16_zero2 needs sm80+",
        "fp16_zero3_block_scaling": None,
    }
    assert h100["triton"] is None and h100["flex"] is None and h100["dtype"] == "bfloat16"
    assert all(why is None for _, why in h100["runs"])


def test_run_configs_come_from_the_shipped_files():
    """bf16 ZeRO-2 and fp16 ZeRO-3 on a GPU, with the run's micro-batch; off a GPU the same engine settings
    without the 16-bit section."""
    bf16, fp16 = (run_ds_config(s, 8, on_gpu=True) for s in RUNS)
    assert (bf16["bf16"]["enabled"], bf16["zero_optimization"]["stage"]) == (True, 2)
    assert (fp16["fp16"]["enabled"], fp16["zero_optimization"]["stage"], fp16["fp16"]["loss_scale"]) == (True, 3, 0)
    assert bf16["train_micro_batch_size_per_gpu"] == fp16["train_micro_batch_size_per_gpu"] == 8
    cpu = run_ds_config(RUNS[1], 2, on_gpu=False)
    assert "fp16" not in cpu and cpu["zero_optimization"] == fp16["zero_optimization"]


def test_synthetic_tokens_are_a_function_of_the_text(tiny_cfg):
    p = tiny_cfg.prior
    text, image = synthetic_tokens(p, 16)
    assert text.min() >= 1 and text.max() < p.text_vocab_size and image.max() < p.image_vocab_size
    j = 5
    assert torch.equal(image[:, j], (31 * text[:, j % p.text_len] + j) % p.image_vocab_size)


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory):
    """Both training runs of the check, 3 steps of the tiny prior on CPU."""
    torch.set_num_threads(1)
    return [short_run(s, out_dir=tmp_path_factory.mktemp(s.name), preset="tiny", steps=3, micro_batch=2) for s in RUNS]


def test_short_runs_report_scales_and_skips(cpu_runs):
    """The step loop of the gpu-check runs: 3 finite steps each; no loss scale off fp16 (S = 1); the
    block-scaling run reports one paper-mode scale per resblock branch, M·2^13 grown by 2^(1/1000) per step."""
    bf16, fp16 = cpu_runs
    assert (bf16["zero_stage"], fp16["zero_stage"]) == (2, 3)
    for r in cpu_runs:
        assert r["steps"] == 3 and r["finite"] and r["precision"] == "fp32" and r["attention_backend"] == "sparse"
        assert r["loss_scale"] == {"initial": 1.0, "final": 1.0, "min": 1.0, "max": 1.0, "changes": 0}
        assert r["skipped_steps"] == {"deepspeed_overflow": 0, "block_scaler": 0}
        assert len(r["losses"]) == 3 and r["peak_memory_bytes"] is None
    assert bf16["block_scales_log2"] is None
    b = fp16["block_scales_log2"]
    assert len(b["names"]) == len(b["final"]) == 8  # tiny: 4 layers x (attn, mlp)
    assert all(math.isclose(x, 13 + 3 / 1000) for x in b["final"]) and b["steps_with_bad_blocks"] == 0
    # ZeRO-2 and ZeRO-3 with block scales start from the same weights and data: the same first loss
    assert math.isclose(bf16["loss_first"], fp16["loss_first"], rel_tol=1e-6)


def test_report_assembly(cpu_runs):
    """One strict-JSON report: PASS/FAIL lines for accuracy (Triton error vs twice SDPA's), runs and targets;
    speed-ups against SDPA causal and flex computed from the timing rows; the largest peak memory."""
    accuracy = [
        {"layout": "row", "dtype": "bfloat16", "triton": [2e-3, 4e-3, 4e-3, 4e-3], "sdpa": [2e-3, 3e-3, 3e-3, 3e-3]},
        {"layout": "conv", "dtype": "float16", "triton": [5e-3, 1e-4, 1e-4, 1e-4], "sdpa": [1e-3, 1e-4, 1e-4, 1e-4]},
    ]
    attention = {
        "rows": [
            {"layout": "row", "backend": "triton", "fwd_bwd_ms": 2.0},
            {"layout": "row", "backend": "flex", "fwd_bwd_ms": 3.0},
            {"layout": "causal(is_causal)", "backend": "sdpa_causal", "fwd_bwd_ms": 5.0},
            {"layout": "conv", "backend": "triton", "skipped": "x"},
        ]
    }
    phases = {"accuracy": {"seconds": 1.0, "peak_memory_bytes": 7}, "attention_timing": {"skipped": "time budget"}}
    runs = [*cpu_runs, {"name": "bf16_zero2", "skipped": "bf16_zero2 needs sm80+"}]
    r = assemble(
        device={"name": "test"}, phases=phases, accuracy=accuracy, runs=runs, attention=attention, targets=["t PASS"]
    )
    assert r["attention_vs_references"] == {
        "row": {"triton_fwd_bwd_ms": 2.0, "x_vs_sdpa_causal": 2.5, "x_vs_flex_same_tiles": 1.5}
    }
    s = r["summary"]
    assert s[0] == "accuracy row bfloat16: triton/sdpa error <= 1.33x PASS"
    assert s[1] == "accuracy conv float16: triton/sdpa error <= 5.00x FAIL" and not r["passed"]
    assert any(line.startswith("run fp16_zero3_block_scaling: loss ") for line in s)
    assert "run bf16_zero2: skipped (bf16_zero2 needs sm80+)" in s and "t PASS" in s
    assert "phase attention_timing: skipped (time budget)" in s
    assert r["peak_memory_bytes"] == 7
    text = json.dumps(finite_json({**r, "x": float("nan")}), allow_nan=False)
    assert json.loads(text)["x"] is None
    assert vs_references({}) == {}
