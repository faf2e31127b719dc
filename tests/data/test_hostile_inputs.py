"""Issue 17 items 3 and 6: inputs that used to kill, hang or exhaust a pass are skipped and counted by kind
(a truncated webdataset shard, a FIFO caption, a parquet `path` to /dev/zero or outside the dataset), and
records with two defects are counted under the one that explains them."""

import json
import os
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dirty import GOOD, png, put, rgb, shard_samples, write_shard  # noqa: E402

from dalle_ds.config import ConfigError, load_config  # noqa: E402
from dalle_ds.data.encode_grids import encode_to_disk, load_encoded  # noqa: E402
from dalle_ds.data.report import PassReport  # noqa: E402
from dalle_ds.data.sources import image_dataset, stream_items  # noqa: E402


def data_cfg(kind, path, *extra):
    return load_config(
        "tiny", overrides=[f"data.dataset={kind}", f"data.path={path}", "data.val_fraction=0", *extra]
    ).data


def read_pass(cfg, streaming: bool) -> tuple[list[str], dict]:
    """(kept captions in reading order, pass counts) of the train split, streamed or map-style."""
    cfg.streaming, report = streaming, PassReport()
    captions = [item["caption"] for _, item in stream_items(cfg, "train", report=report)]
    return captions, report.as_dict()


def cut(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


def test_truncated_shard_keeps_what_precedes_the_cut_and_reads_on(tmp_path):
    """Shard b is cut inside the image of its third sample: its first two samples are kept, the rest of it is
    one `truncated_shard`, and shard c after it is read whole; the same streamed and map-style."""
    samples = {s: shard_samples(s, 5, seed=10 * k) for k, s in enumerate("abc")}
    starts = {s: write_shard(tmp_path / f"{s}.tar", samples[s]) for s in "abc"}
    cut(tmp_path / "b.tar", starts["b"][2] + tarfile.BLOCKSIZE + 100)  # header whole, image data cut
    want = [c.decode() for s in "abc" for _, _, c in (samples[s][:2] if s == "b" else samples[s])]
    for streaming in (True, False):
        captions, rep = read_pass(data_cfg("webdataset", tmp_path / "*.tar"), streaming)
        assert captions == want, streaming
        assert rep["skipped"] == {"truncated_shard": 1} and rep["kept"] == 12, (streaming, rep)


def test_every_cut_point_of_a_shard(tmp_path):
    """Cut a 4-sample shard at every 61st byte. Reference, from the intact shard's own member offsets: a sample
    is kept when the next sample's first header is whole (the last one when the archive's end is reached);
    below one header the file is a `bad_shard`, short of the end a `truncated_shard`. Both readers agree."""
    whole = tmp_path / "whole.tar"
    starts = write_shard(whole, [(f"k{i}", png(rgb(8, 8, seed=i)), f"{GOOD} {i}".encode()) for i in range(4)])
    with tarfile.open(whole) as tf:
        last = tf.getmembers()[-1]
        end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    data = whole.read_bytes()
    for at in range(0, len(data), 61):
        (tmp_path / "x.tar").write_bytes(data[:at])
        kept = sum(s + tarfile.BLOCKSIZE <= at for s in starts[1:]) + (at >= end)
        kind = "bad_shard" if at < tarfile.BLOCKSIZE else "truncated_shard" if at < end else None
        for streaming in (True, False):
            captions, rep = read_pass(data_cfg("webdataset", tmp_path / "x.tar"), streaming)
            assert captions == [f"{GOOD} {i}" for i in range(kept)], (at, streaming)
            assert rep["skipped"] == ({kind: 1} if kind else {}), (at, streaming, rep)


def test_dvae_stream_and_encode_go_on_past_a_truncated_shard(tmp_path, one_thread):
    """train-dvae (streaming) and encode (streaming and map-style) finish over shards of which one is cut, and
    count it: the pass used to end with tarfile.ReadError from inside `datasets`."""
    from helpers import write_ds_config

    from dalle_ds.dvae import DVAE
    from dalle_ds.dvae.train import train_dvae

    starts = write_shard(tmp_path / "a.tar", shard_samples("a", 6, seed=0))
    write_shard(tmp_path / "b.tar", shard_samples("b", 10, seed=50))
    cut(tmp_path / "a.tar", starts[3] + 700)
    over = ["data.dataset=webdataset", f"data.path={tmp_path / '*.tar'}", "data.val_fraction=0.2"]
    cfg = load_config("tiny", overrides=[*over, "data.streaming=true", "dvae_train.steps=3"])
    s = train_dvae(
        cfg, ds_config=write_ds_config(tmp_path / "ds.json", micro=4, stage=0), out_dir=tmp_path / "run", progress=False
    )
    assert s["step"] == 3
    rep = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert rep["train"]["skipped"].get("truncated_shard", 0) + rep["val"]["skipped"].get("truncated_shard", 0) == 1
    torch.manual_seed(0)
    dvae = DVAE(cfg.dvae).eval()
    for streaming in ("true", "false"):
        enc = load_config("tiny", overrides=[*over, f"data.streaming={streaming}"])
        out = encode_to_disk(dvae, enc, tmp_path / f"enc_{streaming}", chunk=4, batch=4)
        counts = json.loads((out / "encode_report.json").read_text())
        assert sum(counts[sp]["skipped"].get("truncated_shard", 0) for sp in ("train", "val")) == 1, streaming
        assert sum(len(load_encoded(out, sp)[0]) for sp in ("train", "val")) == 3 + 10, streaming


def _in_thread(fn, timeout: float):
    """fn() in a daemon thread; fails the test instead of hanging it if fn blocks."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still blocked after {timeout} s"
    return out["value"]


def test_fifo_and_device_files_in_a_folder_are_refused_not_read(tmp_path):
    """A FIFO caption used to block the pass forever (open waits for a writer); a FIFO image or a symlink to
    /dev/zero named *.png are refused as well, and an image over data.max_image_bytes is refused unread."""
    root = tmp_path / "d"
    root.mkdir()
    for i in range(3):
        put(root, f"good{i}.png", png(rgb(seed=i)), GOOD.encode())
    put(root, "fifocap.png", png(rgb(seed=5)), None)
    os.mkfifo(root / "fifocap.txt")
    os.mkfifo(root / "fifoimg.png")
    put(root, "fifoimg.png", None, GOOD.encode())
    os.symlink("/dev/zero", root / "zero.png")
    put(root, "zero.png", None, GOOD.encode())
    put(root, "big.png", png(rgb(200, 200, seed=6)), GOOD.encode())  # ~120 kB
    cfg = data_cfg("folder", root, "data.max_image_bytes=50000")
    ds = _in_thread(lambda: image_dataset(cfg, "train"), timeout=60)
    assert ds.report.skipped == {"caption_not_regular_file": 1, "image_not_regular_file": 2, "image_too_large": 1}
    assert len(ds) == 3


def _parquet(path: Path, images: list) -> None:
    import datasets

    datasets.Dataset.from_dict({"image": images, "caption": [GOOD] * len(images)}).to_parquet(str(path))


def test_parquet_paths_stay_inside_the_dataset(tmp_path):
    """Image `path`s in a parquet file: /dev/zero used to be read until memory ran out. A path is read only if
    it resolves inside the parquet file's folder (absolute, ../ and symlinks out are refused unless
    data.allow_absolute_paths), only if it is a regular file, and only up to data.max_image_bytes."""
    root, outside = tmp_path / "set", tmp_path / "elsewhere"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    (root / "img" / "a.png").write_bytes(png(rgb(seed=1)))
    (root / "img" / "big.png").write_bytes(png(rgb(200, 200, seed=2)))
    (outside / "b.png").write_bytes(png(rgb(seed=3)))
    os.symlink("/dev/zero", root / "img" / "zero.png")
    rows = {
        "img/a.png": "kept",
        str(root / "img" / "a.png"): "kept",  # absolute, but inside
        "/dev/zero": "image_path_outside_root",
        str(outside / "b.png"): "image_path_outside_root",
        "../elsewhere/b.png": "image_path_outside_root",
        "img/zero.png": "image_path_outside_root",  # a symlink out of the folder
        "img": "image_not_regular_file",
        "img/big.png": "image_too_large",
        "img/missing.png": "image_unreadable",
    }
    _parquet(root / "p.parquet", [{"bytes": None, "path": p} for p in rows])
    allowed = {**rows, "/dev/zero": "image_not_regular_file", "img/zero.png": "image_not_regular_file"}
    allowed[str(outside / "b.png")] = allowed["../elsewhere/b.png"] = "kept"
    for extra, expect in (([], rows), (["data.allow_absolute_paths=true"], allowed)):
        want = {k: list(expect.values()).count(k) for k in set(expect.values()) - {"kept"}}
        for streaming in (True, False):
            cfg = data_cfg("parquet", root / "p.parquet", "data.max_image_bytes=50000", *extra)
            captions, rep = _in_thread(lambda c=cfg, s=streaming: read_pass(c, s), timeout=60)
            assert rep["skipped"] == want, (extra, streaming, rep)
            assert len(captions) == list(expect.values()).count("kept"), (extra, streaming)


def test_string_image_column_is_reported_as_such(tmp_path):
    """A column of file names or URLs is not images: counted as image_is_string, not zero_byte."""
    _parquet(tmp_path / "s.parquet", ["img/a.png", "https://example.com/x.jpg"])
    for streaming in (True, False):
        _, rep = read_pass(data_cfg("parquet", tmp_path / "s.parquet"), streaming)
        assert rep["skipped"] == {"image_is_string": 2}, rep


def test_boilerplate_and_converted_captions_are_counted_as_such(tmp_path):
    """A caption that is all boilerplate is `caption_boilerplate` even when short ("DSC01234" used to count
    as caption_too_short); a non-UTF-8 caption is counted as converted also when its record is then filtered,
    and in a webdataset shard (where `datasets` used to raise UnicodeDecodeError)."""
    caps = {
        "boiler1": b"DSC01234",
        "boiler2": b"IMG_1234.JPG",
        "boiler3": b"untitled",
        "short": b"logo",
        "latin_kept": "a small café at the top left".encode("latin-1"),
        "latin_short": "café".encode("latin-1"),
        "good": GOOD.encode(),
    }
    root = tmp_path / "d"
    root.mkdir()
    for i, (name, cap) in enumerate(caps.items()):
        put(root, f"{name}.png", png(rgb(seed=i)), cap)
    write_shard(tmp_path / "s.tar", [(name, png(rgb(seed=i)), cap) for i, (name, cap) in enumerate(caps.items())])
    for kind, path in (("folder", root), ("webdataset", tmp_path / "s.tar")):
        for streaming in (True, False):
            captions, rep = read_pass(data_cfg(kind, path), streaming)
            assert rep["filtered"] == {"caption_boilerplate": 3, "caption_too_short": 2}, (kind, rep)
            assert rep["converted"] == {"caption_not_utf8": 2}, (kind, rep)
            assert sorted(captions) == sorted([GOOD, "a small café at the top left"]), kind


def test_max_image_bytes_is_validated():
    with pytest.raises(ConfigError, match="data.max_image_bytes"):
        load_config("tiny", overrides=["data.max_image_bytes=0"])
