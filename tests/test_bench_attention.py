"""Attention benchmark (dalle_ds/attention/bench.py): forward and forward+backward per layout and backend at the
paper's shape (256 + 32x32 tokens, head size 64; CPU: 8 heads, batch 1, fp32; GPU: 16 heads, batch 4,
bf16). Run with `pytest -m bench tests/test_bench_attention.py -s`; prints a table and writes
bench_results/attention_<device>.json. The two small unmarked tests keep the CLI and the FlexAttention
mask honest in the default run.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dalle_ds.attention import bench
from dalle_ds.attention.layout import FULL, block_layout
from dalle_ds.attention.masks import MaskSpec
from dalle_ds.cli import bench as bench_cli

OUT = Path(__file__).resolve().parents[1] / "bench_results"


@pytest.mark.bench
def test_bench_attention_paper_shape():
    """Every layout and available backend at the paper shape; on CPU the sparse backend's forward+backward
    must be at least 1.8x faster than dense for the row and (transposed) column layers, with the same
    outputs within 1e-5 (fp32)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = bench.bench_attention(device=device, warmup=2, repeats=5)
    print("\n" + bench.format_table(result))
    OUT.mkdir(exist_ok=True)
    (OUT / f"attention_{device}.json").write_text(json.dumps(result, indent=2))
    rows = {(r["layout"], r["backend"]): r for r in result["rows"] if "fwd_ms" in r}
    if device == "cpu":
        for layout in ("row", "column_t"):
            r = rows[(layout, "sparse")]
            assert r["max_abs_diff_vs_dense"] <= 1e-5
            assert r["speedup_fwd_bwd_vs_dense"] >= 1.8, (layout, r["speedup_fwd_bwd_vs_dense"])


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    """`dalle-ds bench attention --json FILE` (dalle_ds.cli.bench.main) on a tiny shape: a table row per layout and
    backend, and the same rows in the JSON file."""
    out = tmp_path / "a.json"
    bench_cli.main(
        [
            "attention",
            "--text-len",
            "5",
            "--grid",
            "4",
            "--heads",
            "1",
            "--head-dim",
            "16",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--backends",
            "dense",
            "sparse",
            "--json",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert {(r["layout"], r["backend"]) for r in data["rows"]} == {
        (layout, b) for layout in bench.LAYOUTS for b in ("dense", "sparse")
    }
    for r in data["rows"]:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["max_abs_diff_vs_dense"] < 1e-5
    assert "column_t" in text and "x dense" in text
    assert data["kernel_compile"] is None  # triton not asked for: nothing compiled


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_json_records_the_triton_kernels_registers_and_spills(tmp_path, capsys):
    """With triton among the backends the JSON carries ptxas's registers and spills per kernel: on a CPU
    (no timing of triton, it says why) for sm90 and sm80 in bf16, the GPU default."""
    out = tmp_path / "a.json"
    argv = ["attention", "--text-len", "5", "--grid", "4", "--heads", "1", "--head-dim", "16"]
    argv += ["--warmup", "0", "--repeats", "1", "--layouts", "row", "--backends", "triton", "--json", str(out)]
    bench_cli.main(argv)
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [r["backend"] for r in data["rows"]] == ["triton"] and "GPU" in data["rows"][0]["skipped"]
    compiled = data["kernel_compile"]
    assert compiled["targets"] == [90, 80] and compiled["dtype"] == "bf16"
    got = {(r["kernel"], r["arch"]) for r in compiled["rows"]}
    assert got == {(k, a) for k in ("forward", "backward_dkdv", "backward_dq") for a in ("sm90", "sm80")}
    assert all(0 < r["n_regs"] <= 255 and r["n_spills"] >= 0 and r["dtype"] == "bf16" for r in compiled["rows"])
    assert "Triton kernels as compiled" in text and "backward_dkdv" in text


@pytest.mark.parametrize("layout", ["row", "column_t", "conv"])
def test_flex_block_mask_has_the_layout_tiles(layout):
    """The BlockMask the GPU comparison gives FlexAttention (built from masks.mask_mod) has exactly the
    layout's non-empty and full tiles at the same block size."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    kind, permuted = bench.LAYOUTS[layout]
    spec = MaskSpec(kind, 256, 8, 5)  # L = 320, a multiple of 32
    L = spec.seq_len
    bm = flex.create_block_mask(bench.flex_mask_mod(spec, permuted), None, None, L, L, device="cpu", BLOCK_SIZE=32)
    lay = block_layout(spec, 32, permuted=permuted)

    def tiles(num, idx):
        return {(qb, int(idx[0, 0, qb, j])) for qb in range(lay.n_q_blocks) for j in range(int(num[0, 0, qb]))}

    partial = tiles(bm.kv_num_blocks, bm.kv_indices)
    full = tiles(bm.full_kv_num_blocks, bm.full_kv_indices)
    nonempty = {tuple(t) for t in torch.nonzero(lay.block_kind).tolist()}
    ours_full = {tuple(t) for t in torch.nonzero(lay.block_kind == FULL).tolist()}
    assert full == ours_full
    assert partial | full == nonempty


def test_rows_report_the_block_density_limit_against_sdpa_causal():
    """Every timed row carries its speed-up over sdpa_causal (fwd, fwd+bwd), the block-density limit
    tile_density_32(causal) / tile_density_32(layout) computed from the layouts themselves, and the fraction of
    that limit reached; the table prints them."""
    result = bench.bench_attention(
        text_len=64,
        grid=8,
        heads=1,
        head_dim=16,
        warmup=0,
        repeats=1,
        backends=["sparse", "sdpa_causal"],
        log=lambda _: None,
    )
    causal = block_layout(MaskSpec("causal", 64, 8, 11), 32).density
    for r in result["rows"]:
        kind, permuted = bench.LAYOUTS.get(r["layout"], ("causal", False))
        limit = causal / block_layout(MaskSpec(kind, 64, 8, 11), 32, permuted=permuted).density
        assert r["density_limit_vs_sdpa_causal"] == pytest.approx(limit)
        assert r["fraction_of_limit_fwd"] == pytest.approx(r["speedup_fwd_vs_sdpa_causal"] / limit)
        assert r["fraction_of_limit_fwd_bwd"] == pytest.approx(r["speedup_fwd_bwd_vs_sdpa_causal"] / limit)
    assert "% lim" in bench.format_table(result)
