"""Ahead-of-time compilation of the Triton kernels (kernels/aot.py) for sm90 and sm80, fp16, bf16 and tf32, on a
machine without a GPU: Triton's own ptxas turns each kernel into a cubin, so a kernel that does not compile
for a real GPU fails here, in the default CPU run, and not only on a GPU machine. About 35 s (in a test run
that interprets, the compilation runs in a child process).
"""

import importlib.util
import json
import os

import pytest

from dalle_ds.kernels import aot

# Not pytest.importorskip: importing triton here, at collection, would happen before the other kernel test
# modules set TRITON_INTERPRET=1, and Triton decides at import whether its own tl.max, tl.sum... are
# compiled or interpreted (the interpreted kernels then fail). aot imports triton only when called.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

TARGETS = (90, 80)
DTYPES = ("fp16", "bf16", "tf32")  # tf32: fp32 inputs with TF32 dots (an fp32 config with allow_tf32)


@pytest.fixture(scope="module")
def rows():
    """Every kernel compiled once per (arch, dtype); the table is printed (pytest -s shows it)."""
    rows = aot.compile_all(TARGETS, DTYPES)
    print("\n" + aot.format_table(rows))
    return rows


def test_every_kernel_compiles_for_sm90_and_sm80_in_fp16_bf16_and_tf32(rows):
    """Forward, dK/dV and dQ each compile to a cubin for both architectures and every input type."""
    got = {(r["kernel"], r["arch"], r["dtype"]) for r in rows}
    assert got == {(k, f"sm{a}", d) for k in aot.KERNELS for a in TARGETS for d in DTYPES}
    assert len(rows) == len(got)


def test_rows_report_registers_spills_and_compile_time(rows):
    """Each row carries ptxas's register count (at most 255 per thread), spills (local memory words, as
    Triton's runtime CompiledKernel.n_spills), shared memory and compile seconds, and is JSON-ready."""
    for r in rows:
        assert 0 < r["n_regs"] <= 255, r
        assert r["n_spills"] >= 0 and r["spill_store_bytes"] >= 0 and r["spill_load_bytes"] >= 0, r
        assert r["shared_bytes"] > 0 and r["seconds"] > 0, r
    json.dumps(rows)


def test_compiles_from_a_process_that_interprets(monkeypatch):
    """With TRITON_INTERPRET=1 (as the kernel tests set it) nothing compiles in-process (Triton's own
    tl.max, tl.sum... are then interpreter functions): compile_all runs in a child process instead, with
    the same rows, and leaves the variable set here."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert aot.interpreter_process()
    rows = aot.compile_all((90,), ("fp16",))
    assert [(r["kernel"], r["arch"], r["dtype"]) for r in rows] == [(k, "sm90", "fp16") for k in aot.KERNELS]
    assert all(r["n_regs"] > 0 for r in rows)
    assert os.environ["TRITON_INTERPRET"] == "1"


def test_ptxas_log_parser():
    """Registers and local memory (stack frame bytes / 4) come from ptxas -v's lines."""
    log = (
        "ptxas info    : Function properties for k\n"
        "    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 392 bytes cmem[0]\n"
    )
    usage = aot._ptxas_usage(log, "k")
    assert usage == dict(n_regs=255, n_spills=6, spill_store_bytes=16, spill_load_bytes=12)
    with pytest.raises(RuntimeError, match="no register"):
        aot._ptxas_usage("nothing", "k")
