"""External sources, robust decoding, the paper's filters and preprocessing (issue 5, items 1-4)."""

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dirty import GOOD, make_dirty_folder, png, put, rgb  # noqa: E402

from dalle_ds.config import ConfigError, load_config  # noqa: E402
from dalle_ds.data.filters import caption_rejection, image_rejection, is_english, strip_boilerplate  # noqa: E402
from dalle_ds.data.preprocess import preprocess_dvae, preprocess_prior  # noqa: E402
from dalle_ds.data.sources import image_dataset, stream_items  # noqa: E402


def cfg_for(kind, path, *extra):
    return load_config("tiny", overrides=[f"data.dataset={kind}", f"data.path={path}", "data.val_fraction=0", *extra])


def test_dirty_folder_counts_every_defect_kind(tmp_path):
    """A folder with one of every defect: each is converted or skipped, and counted under its own kind."""
    expected = make_dirty_folder(tmp_path / "dirty")
    ds = image_dataset(cfg_for("folder", tmp_path / "dirty").data, "train")
    rep = ds.report.as_dict()
    assert rep["kept"] == expected["kept"] == len(ds)
    assert rep["skipped"] == expected["skipped"]
    assert rep["converted"] == expected["converted"]
    assert rep["filtered"] == expected["filtered"]
    assert rep["seen"] == rep["kept"] + sum(rep["skipped"].values()) + sum(rep["filtered"].values())
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 16, 16) and str(item["image"].dtype) == "torch.uint8"
        assert item["caption"]
    assert any("café" in ds[i]["caption"] for i in range(len(ds)))  # the latin-1 caption was converted


def test_conversions_give_right_colours(tmp_path):
    """CMYK/grayscale/RGBA/16-bit images come out as RGB with the expected pixel values."""
    from PIL import Image

    from dalle_ds.data.decode import decode_image

    a, conv = decode_image(png(Image.new("RGBA", (8, 8), (255, 0, 0, 0))))
    assert conv == "rgba" and (a == 255).all()  # transparent -> composited on white
    a, conv = decode_image(png(Image.fromarray(np.full((8, 8), 65535, np.uint16))))
    assert conv == "high_bit_depth" and (a == 255).all()
    a, conv = decode_image(png(Image.new("L", (8, 8), 100)))
    assert conv == "grayscale" and (a == 100).all()


def test_each_filter_rule_and_switch():
    cfg = load_config("tiny").data
    assert caption_rejection(GOOD, cfg) is None
    assert caption_rejection("dog", cfg) == "caption_too_short"
    assert caption_rejection("photographed on 2014-06-03 by me", cfg) == "caption_boilerplate"
    assert caption_rejection("IMG_1234.JPG DSC01234 12 June 2014", cfg) == "caption_boilerplate"
    assert caption_rejection("a dog photographed on 2014-06-03 in the park", cfg) is None  # real words remain
    assert caption_rejection("ein kleiner Hund spielt im Garten", cfg) == "caption_not_english"
    assert caption_rejection("一只小狗在花园里玩耍 很 开心", cfg) == "caption_not_english"
    assert is_english("a man riding a horse on the beach")
    assert strip_boilerplate("sunset IMG_1234.JPG") == "sunset"
    assert image_rejection(100, 100, cfg) is None and image_rejection(200, 100, cfg) is None
    assert image_rejection(201, 100, cfg) == "aspect_ratio" and image_rejection(100, 201, cfg) == "aspect_ratio"
    cfg.min_caption_words, cfg.filter_boilerplate, cfg.filter_english, cfg.filter_aspect = 0, False, False, False
    assert caption_rejection("a", cfg) is None
    assert caption_rejection("photographed on 2014-06-03", cfg) is None
    assert caption_rejection("ein kleiner Hund spielt im Garten", cfg) is None
    assert image_rejection(1000, 10, cfg) is None


def test_filters_switch_off_in_a_pass(tmp_path):
    make_dirty_folder(tmp_path / "d")
    ds = image_dataset(
        cfg_for(
            "folder",
            tmp_path / "d",
            "data.min_caption_words=0",
            "data.filter_english=false",
            "data.filter_boilerplate=false",
            "data.filter_aspect=false",
        ).data,
        "train",
    )
    assert ds.report.filtered == {} and ds.report.kept == 12 + 6


def test_config_names_bad_fields():
    with pytest.raises(ConfigError, match="data.path"):
        load_config("tiny", overrides=["data.dataset=folder"])
    with pytest.raises(ConfigError, match="data.dataset"):
        load_config("tiny", overrides=["data.dataset=laion", "data.path=/x"])
    with pytest.raises(ConfigError, match="data.min_aspect"):
        load_config("tiny", overrides=["data.min_aspect=1.5"])


def _build_sources(root: Path):
    import datasets

    imgs = [png(rgb(seed=i)) for i in range(8)]
    caps = [f"{GOOD} number {i}" for i in range(7)] + ["IMG_0001.JPG"]
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in imgs], "caption": caps}).cast_column(
        "image", datasets.Image()
    ).save_to_disk(str(root / "disk"))
    datasets.Dataset.from_dict({"jpg": imgs, "text": caps}).to_parquet(str(root / "p.parquet"))
    (root / "if").mkdir()
    with open(root / "if" / "metadata.jsonl", "w") as f:
        for i, (b, c) in enumerate(zip(imgs, caps)):
            (root / "if" / f"{i}.png").write_bytes(b)
            f.write(json.dumps({"file_name": f"{i}.png", "caption": c}) + "\n")
    for s in range(2):
        with tarfile.open(root / f"shard{s}.tar", "w") as tf:
            for i in range(4):
                for ext, data in (("png", imgs[s * 4 + i]), ("txt", caps[s * 4 + i].encode())):
                    ti = tarfile.TarInfo(f"{s}_{i:03d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    (root / "folder").mkdir()
    for i, (b, c) in enumerate(zip(imgs, caps)):
        put(root / "folder", f"{i}.png", b, c.encode())
    return {
        "hf_disk": root / "disk",
        "parquet": root / "p.parquet",
        "imagefolder": root / "if",
        "webdataset": str(root / "shard*.tar"),
        "folder": root / "folder",
    }


def test_every_source_kind_reads_the_same_pairs(tmp_path):
    """folder, save_to_disk, parquet, imagefolder+metadata and webdataset tars give the same kept captions;
    streaming + rank sharding covers every record once, and a resumed stream continues where it stopped."""
    paths = _build_sources(tmp_path)
    want = sorted(f"{GOOD} number {i}" for i in range(7))
    for kind, path in paths.items():
        cfg = cfg_for(kind, path)
        ds = image_dataset(cfg.data, "train")
        assert sorted(ds[i]["caption"] for i in range(len(ds))) == want, kind
        assert ds.report.filtered == {"caption_boilerplate": 1}, kind  # "IMG_0001.JPG"
        cfg.data.streaming = True
        shards = [list(stream_items(cfg.data, "train", rank=r, world=2)) for r in range(2)]
        assert sorted(it["caption"] for sh in shards for _, it in sh) == want, kind
        first = shards[0][:2]
        resumed = list(stream_items(cfg.data, "train", rank=0, world=2, start=first[-1][0]))
        assert [it["caption"] for _, it in first + resumed] == [it["caption"] for _, it in shards[0]], kind


def test_hash_split_is_disjoint_and_stable(tmp_path):
    paths = _build_sources(tmp_path)
    cfg = cfg_for(
        "folder", paths["folder"], "data.val_fraction=0.4", "data.filter_boilerplate=false", "data.min_caption_words=0"
    )
    tr, va = image_dataset(cfg.data, "train"), image_dataset(cfg.data, "val")
    assert len(tr) + len(va) == 8 and len(va) >= 1
    assert not {tr[i]["caption"] for i in range(len(tr))} & {va[i]["caption"] for i in range(len(va))}


def test_preprocessing_listings():
    """Listing 1 flips and crops anywhere; Listing 2 never flips and stays near the centre."""
    R = 16
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :40, 0] = 255  # left half red, right half blue
    img[:, 40:, 2] = 255
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(40):
        out = preprocess_prior(img, R, rng)
        assert out.shape == (3, R, R)
        # near-centre crop of a 40x80 image: the centre column (red|blue edge) is inside -> both colours,
        # red on the left (no flip)
        assert out[0, :, 0].float().mean() > 200 and out[2, :, -1].float().mean() > 200
    for _ in range(60):
        out = preprocess_dvae(img, R, rng)
        assert out.shape == (3, R, R)
        flips += int(out[2, :, 0].float().mean() > 200 and out[0, :, -1].float().mean() > 200)
    assert 0 < flips < 60  # random horizontal flips (and random crops) happen, not always
    small = preprocess_prior(np.full((8, 10, 3), 7, np.uint8), R, rng)  # smaller than R: upsampled
    assert small.shape == (3, R, R) and int(small.max()) == 7


def test_dvae_training_over_dirty_folder_logs_counts(tmp_path, capsys):
    """A tiny dVAE run over a folder with every defect finishes and logs/writes the per-kind counts."""
    from helpers import write_ds_config

    from dalle_ds.dvae.train import train_dvae

    expected = make_dirty_folder(tmp_path / "dirty", n_good=10)
    cfg = cfg_for("folder", tmp_path / "dirty", "data.val_fraction=0.2", "dvae_train.steps=3", "dvae_train.log_every=1")
    s = train_dvae(
        cfg, ds_config=write_ds_config(tmp_path / "ds.json", micro=4, stage=0), out_dir=tmp_path / "run", progress=False
    )
    assert s["step"] == 3 and np.isfinite(s["recon_psnr"])
    rep = json.loads((tmp_path / "run" / "data_report.json").read_text())
    total = {k: rep["train"]["skipped"].get(k, 0) + rep["val"]["skipped"].get(k, 0) for k in expected["skipped"]}
    assert total == expected["skipped"]
    assert rep["train"]["kept"] + rep["val"]["kept"] == expected["kept"]
    assert "skipped:" in capsys.readouterr().out
