"""GPU benchmark of the block-sparse attention kernels (issue 3's GPU numbers), kept so they reproduce.

    python -m dalle_ds.kernels.bench_gpu [--json bench_results/attention_gpu.json] [--repeats 20]

Needs a CUDA GPU, torch with FlexAttention and triton, and an installed checkout (`pip install -e .`:
setup.py ships this folder as `dalle_ds.kernels`, so run it as a module, not as a file path). The JSON
goes to bench_results/ under the current directory unless --json says otherwise.

What it does, at the paper shape (T = 256 + 32x32 = 1280 tokens, head size 64, 16 heads, batch 4, bf16):
  1. correctness: the Triton kernels' out/dQ/dK/dV in bf16 and fp16 vs a float64 reference, next to
     SDPA's error in the same dtype, for every layout;
  2. timing: `dalle_ds.attention.bench.bench_attention` (forward and forward+backward for dense, sparse, triton,
     flex with a BlockMask from masks.mask_mod, and SDPA is_causal), the table and JSON;
  3. the issue's targets for the row and transposed-column layers, forward+backward: triton >= 1.3x
     flex and >= 2x SDPA causal; achieved density-scaled TFLOP/s against SDPA causal's TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def check_accuracy(device, heads: int = 4, batch: int = 1) -> list[dict]:
    """Max errors vs float64 of the Triton kernels and of SDPA (same dtype) at the paper shape."""
    import torch
    import torch.nn.functional as F

    from dalle_ds.attention.layout import layout_on
    from dalle_ds.attention.masks import MaskSpec
    from dalle_ds.kernels import block_sparse_attention as bsa

    rows = []
    for name, (kind, permuted) in {
        "row": ("row", False),
        "column_t": ("column", True),
        "conv": ("conv", False),
        "causal": ("causal", False),
    }.items():
        spec = MaskSpec(kind, 256, 32, 11)
        lay = layout_on(spec, device, bsa.default_block(device), permuted=permuted)
        L = spec.seq_len
        mask = lay.dense_element_mask()[:L, :L].to(device)
        gen = torch.Generator(device="cpu").manual_seed(0)
        base = [torch.randn(batch, heads, L, 64, generator=gen).to(device) for _ in range(4)]
        leaves = [t.double().requires_grad_() for t in base[:3]]
        want_o = bsa.reference(*leaves, lay)
        want_o.backward(base[3].double())
        want = [want_o.detach()] + [t.grad for t in leaves]
        for dtype in (torch.bfloat16, torch.float16):
            errs = {}
            for label, fn in (
                ("triton", lambda q, k, v: bsa.block_sparse_attention(q, k, v, lay)),
                ("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
            ):
                qkv = [t.to(dtype).requires_grad_() for t in base[:3]]
                o = fn(*qkv)
                o.backward(base[3].to(dtype))
                got = [o.detach()] + [t.grad for t in qkv]
                errs[label] = [(a.double() - w).abs().max().item() for a, w in zip(got, want)]
            rows.append({"layout": name, "dtype": str(dtype).replace("torch.", ""), **errs})
            print(
                f"  {name:9s} {rows[-1]['dtype']:9s} triton out/dq/dk/dv "
                + " ".join(f"{e:.1e}" for e in errs["triton"])
                + "   sdpa "
                + " ".join(f"{e:.1e}" for e in errs["sdpa"])
            )
    return rows


def targets(result: dict) -> list[str]:
    """PASS/FAIL lines for the issue's GPU targets."""
    rows = {(r["layout"], r["backend"]): r for r in result["rows"] if "fwd_ms" in r}
    sdpa = next((r for r in result["rows"] if r["backend"] == "sdpa_causal" and "fwd_ms" in r), None)
    lines = []
    for layout in ("row", "column_t"):
        tri, flex = rows.get((layout, "triton")), rows.get((layout, "flex"))
        if tri is None:
            lines.append(f"{layout}: triton was not timed")
            continue
        if flex is not None:
            x = flex["fwd_bwd_ms"] / tri["fwd_bwd_ms"]
            lines.append(f"{layout}: triton vs flex fwd+bwd {x:.2f}x (target >= 1.3x) {'PASS' if x >= 1.3 else 'FAIL'}")
        if sdpa is not None:
            x = sdpa["fwd_bwd_ms"] / tri["fwd_bwd_ms"]
            verdict = "PASS" if x >= 2 else "FAIL"
            lines.append(
                f"{layout}: triton vs SDPA causal fwd+bwd {x:.2f}x (target >= 2x) {verdict}"
                f"; triton {tri['fwd_bwd_tflops']:.1f} density-scaled TFLOP/s vs SDPA causal "
                f"{sdpa['fwd_bwd_tflops']:.1f} TFLOP/s"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=str(Path("bench_results") / "attention_gpu.json"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--skip-accuracy", action="store_true")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("dalle_ds.kernels.bench_gpu needs a CUDA GPU")
    from dalle_ds.attention import bench

    device = torch.device("cuda")
    out = {}
    if not args.skip_accuracy:
        print("accuracy vs float64 (max abs error), paper shape, 4 heads:")
        out["accuracy"] = check_accuracy(device)
    print("timing:")
    result = bench.bench_attention(device="cuda", warmup=args.warmup, repeats=args.repeats)
    print(bench.format_table(result))
    out.update(result)
    out["targets"] = targets(result)
    print("\n".join(out["targets"]))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
