"""StreamOrder: sequential per-rank micro-batches from a stream, resumable from its state (issue 5, item 1)."""

import io
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dirty import GOOD, make_dirty_folder, png, put, rgb  # noqa: E402

from dalle_ds.config import ConfigError, load_config  # noqa: E402
from dalle_ds.data.stream import StreamOrder, chain_digest  # noqa: E402


def cfg_for(kind, path, *extra):
    return load_config(
        "tiny",
        overrides=[f"data.dataset={kind}", f"data.path={path}", "data.val_fraction=0", "data.streaming=true", *extra],
    ).data


def _tars(root: Path, n: int = 10) -> str:
    root.mkdir()
    for s in range(2):
        with tarfile.open(root / f"shard{s}.tar", "w") as tf:
            for i in range(n // 2):
                k = s * (n // 2) + i
                for ext, data in (("png", png(rgb(seed=k))), ("txt", f"{GOOD} number {k}".encode())):
                    ti = tarfile.TarInfo(f"{k:04d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    return str(root / "shard*.tar")


def _read(order, steps, start=0, micro=2, world=1, rank=0):
    gb = micro * world
    return [
        it["key"]
        for s in range(start, steps)
        for it in order.micro_batch(s, global_batch=gb, micro=micro, accum_index=0, rank=rank, world=world)
    ]


@pytest.mark.parametrize("kind,prefetch", [("folder", 0), ("folder", 3), ("webdataset", 2)])
def test_resume_from_state_reads_what_an_uninterrupted_stream_reads(tmp_path, kind, prefetch):
    """Across epochs, whether the source is map-style (folder) or a `datasets` stream (webdataset tars), and
    with items read ahead in a thread: a new order loaded from a saved state continues with exactly the next
    items; the key digest agrees."""
    if kind == "folder":
        make_dirty_folder(tmp_path / "src", n_good=5)  # 11 kept among bad files
        cfg = cfg_for("folder", tmp_path / "src")
    else:
        cfg = cfg_for("webdataset", _tars(tmp_path / "src"))
    full = StreamOrder(cfg, rank=1, world=2)
    want = _read(full, 8, world=2, rank=1)
    assert full.epoch >= 1  # the shard was exhausted and started over
    first = StreamOrder(cfg, rank=1, world=2, prefetch=prefetch)
    got = _read(first, 3, world=2, rank=1)
    state = first.state_dict()
    first.close()
    resumed = StreamOrder(cfg, rank=1, world=2, prefetch=prefetch)
    resumed.load_state_dict(state)
    got += _read(resumed, 8, start=3, world=2, rank=1)
    assert got == want
    assert resumed.state_dict() == full.state_dict()
    digest = ""
    for k in want:
        digest = chain_digest(digest, k)
    assert full.keys_digest == digest
    other = _read(StreamOrder(cfg, rank=0, world=2), 2, world=2, rank=0)
    assert not set(other) & set(want)  # ranks read disjoint records


def test_bad_items_are_counted_across_a_resume_as_in_one_read(tmp_path):
    expected = make_dirty_folder(tmp_path / "src", n_good=5)
    cfg = cfg_for("folder", tmp_path / "src")
    whole = StreamOrder(cfg)
    _read(whole, 6)  # 12 items: the 11 kept of the first epoch and one of the second
    order = StreamOrder(cfg)
    _read(order, 3)
    resumed = StreamOrder(cfg)
    resumed.load_state_dict(order.state_dict())
    _read(resumed, 6, start=3)
    assert resumed.report == whole.report and resumed.epoch == 1 and resumed.report.kept == 12
    for group in ("skipped", "filtered"):  # every kind, once per epoch read so far
        counts = getattr(resumed.report, group)
        assert all(counts[k] >= n for k, n in expected[group].items()), (group, counts)


def test_stream_refuses_out_of_order_reads_and_other_ranks(tmp_path):
    make_dirty_folder(tmp_path / "src", n_good=3)
    order = StreamOrder(cfg_for("folder", tmp_path / "src"))
    with pytest.raises(RuntimeError, match="in order"):
        _read(order, 2, start=1)
    with pytest.raises(ValueError, match="same number of ranks"):
        StreamOrder(order.cfg, rank=0, world=2).load_state_dict(order.state_dict())


def test_a_shard_without_usable_items_is_a_config_error(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    put(root, "a.png", png(rgb(seed=0)), GOOD.encode())
    put(root, "b.png", b"", GOOD.encode())  # rank 1 of 2 gets only this zero-byte file
    order = StreamOrder(cfg_for("folder", root), rank=1, world=2)
    with pytest.raises(ConfigError, match="no usable train records"):
        _read(order, 1, world=2, rank=1)
