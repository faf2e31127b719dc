"""Image-to-image priming, contrastive reranking (own model and the open_clip adapter), `dalle-ds sample` flags."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_encoded_dataset, write_ds_config


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny dVAE, prior and contrastive model files, trained a few steps (seconds)."""
    from dalle_ds.config import load_config
    from dalle_ds.dvae.train import train_dvae
    from dalle_ds.prior.train import train_prior
    from dalle_ds.rerank.train import train_clip

    root = tmp_path_factory.mktemp("models")
    cfg = load_config(
        "tiny",
        overrides=[
            "tokenizer.bpe_dropout=0",
            "dvae_train.steps=2",
            "prior_train.steps=2",
            "data.num_train=32",
            "data.num_val=8",
        ],
    )
    ds = write_ds_config(root / "ds.json", micro=4, stage=0)
    dv = train_dvae(cfg, ds_config=ds, out_dir=root / "dvae", progress=False)
    make_encoded_dataset(root / "tok", cfg, n_train=16, n_val=4)
    pr = train_prior(cfg, ds_config=ds, data_dir=root / "tok", out_dir=root / "prior", progress=False)
    cl = train_clip(cfg, root / "clip", progress=False)
    return {"cfg": cfg, "dvae": dv["path"], "prior": pr["path"], "clip": cl["path"], "clip_summary": cl, "root": root}


class RecordingDVAE(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.grids = inner, []

    def encode(self, x):
        return self.inner.encode(x)

    def decode(self, grid):
        self.grids.append(grid.clone())
        return self.inner.decode(grid)


def test_prime_keeps_the_top_rows(tiny_models, tmp_path):
    """The top R rows of the primed image's argmax grid are kept verbatim in every sample."""
    from PIL import Image

    from dalle_ds.dvae.io import load_dvae
    from dalle_ds.prior.io import load_prior
    from dalle_ds.sampling.generate import generate
    from dalle_ds.sampling.prime import load_image, prime_tokens

    prior, tok, cfg = load_prior(tiny_models["prior"])
    dvae, _ = load_dvae(tiny_models["dvae"], cfg)
    path = tmp_path / "cmyk.jpg"  # any mode works: a CMYK JPEG of a non-square size
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)).convert("CMYK").save(path)
    img = load_image(path, cfg.dvae.image_size)
    assert img.shape == (3, cfg.dvae.image_size, cfg.dvae.image_size)
    g = cfg.prior.image_grid
    prime = prime_tokens(dvae, img, 2)
    assert prime.shape == (2 * g,)
    assert torch.equal(prime, dvae.encode(img[None].float() / 255)[0, :2].flatten())
    rec = RecordingDVAE(dvae)
    cfg.sample.num_per_caption = 3
    out = generate(prior, tok, rec, ["a small red triangle at the top left"], cfg.sample, prime=prime)
    assert out.shape[0] == 3
    grids = torch.cat(rec.grids)  # (3, g, g)
    assert all(torch.equal(gr[:2].flatten(), prime) for gr in grids)
    with pytest.raises(ValueError, match="prime-rows"):
        prime_tokens(dvae, img, g + 1)


def test_rerank_keeps_best_per_caption():
    from dalle_ds.rerank.rerankers import rerank

    class ByBrightness:
        def score(self, images, captions):
            return torch.tensor([float(im.mean()) for im in images])

    imgs = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 50, 30, 5, 1, 7)])
    kept, scores = rerank(ByBrightness(), imgs, ["a", "b"], candidates=3, keep=2)
    assert [int(k[0, 0, 0]) for k in kept] == [50, 30, 7, 5]
    assert scores.tolist() == pytest.approx([50, 30, 7, 5])


def test_own_contrastive_reranker_scores_and_trains(tiny_models):
    """train-clip writes a loadable model; its reranker gives one finite score per image in [-1, 1]."""
    from dalle_ds.rerank.io import load_clip
    from dalle_ds.rerank.rerankers import load_reranker

    s = tiny_models["clip_summary"]
    assert s["step"] == 10 and 0.0 <= s["val_retrieval_top1"] <= 1.0
    assert s["history"][-1]["loss"] < s["history"][0]["loss"] + 1.0
    model, tok, cfg = load_clip(tiny_models["clip"])
    r = load_reranker(clip=tiny_models["clip"])
    imgs = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), np.uint8)
    sc = r.score(imgs, ["a red square"] * 5)
    assert sc.shape == (5,) and torch.all(sc.abs() <= 1.0 + 1e-5)
    big = np.repeat(np.repeat(imgs, 2, 1), 2, 2)  # other resolutions are resized to the model's
    assert r.score(big, ["a red square"] * 5).shape == (5,)


@pytest.mark.parametrize("text_layers", [0, 2])
def test_text_tower_ignores_trailing_padding(text_layers):
    """A caption's embedding is the same alone and in a batch padded to a longer caption (the tower trims
    columns that are padding in every row)."""
    from dalle_ds.config import ClipConfig
    from dalle_ds.rerank.contrastive import TextTower

    torch.manual_seed(0)
    tower = TextTower(ClipConfig(width=16, heads=2, text_layers=text_layers), vocab_size=40, text_len=11).eval()
    lengths = [3, 11, 1, 6, 7]
    ids = torch.zeros(len(lengths), 11, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(1, 40, (n,))
    batch = tower(ids)
    alone = torch.cat([tower(ids[r : r + 1]) for r in range(len(lengths))])
    assert torch.allclose(batch, alone, atol=1e-5)
    assert tower(ids[:, :7]).shape == (5, 128) and torch.isfinite(tower(torch.zeros(2, 11, dtype=torch.long))).all()


def test_shape_stream_sees_a_shape_alike_in_every_colour():
    """With shape_stream the image tower's second stack reads brightness alone: without the colour stack's
    share of the projection, one shape in all six colours embeds identically and another shape differently.
    Without shape_stream the tower keeps the keys of checkpoints written before the option existed."""
    from dalle_ds.config import ClipConfig
    from dalle_ds.data.shapes import COLOURS, ShapeSpec, render_scene
    from dalle_ds.rerank.contrastive import ImageTower

    def images(shape: str) -> torch.Tensor:  # (6, 3, 24, 24): the shape in every palette colour
        scenes = [[ShapeSpec(colour=c, shape=shape, size="large", position="left")] for c in COLOURS]
        return torch.stack([torch.from_numpy(render_scene(s, 24)) for s in scenes]).permute(0, 3, 1, 2) / 255

    torch.manual_seed(0)
    tower = ImageTower(ClipConfig(width=8, embed_dim=16, shape_stream=True)).eval()
    with torch.no_grad():
        full = tower(images("cross"))
        tower.proj.weight[:, : tower.proj.in_features // 2] = 0  # the colour stack's columns come first
        cross, bar = tower(images("cross")), tower(images("bar"))
    assert not torch.allclose(full[0], full[1], atol=1e-3)  # the whole tower tells colours apart
    assert torch.allclose(cross, cross[:1].expand_as(cross), atol=1e-5)  # the shape stack cannot
    assert (cross - bar).abs().amax(1).min() > 1e-3  # but tells shapes apart
    plain = ImageTower(ClipConfig(width=8, embed_dim=16)).state_dict()
    assert {k.split(".")[0] for k in plain} == {"net", "proj"} and "net.0.0.weight" in plain


def test_hard_negative_batches_pair_one_word_neighbours():
    from dalle_ds.rerank.train import draw_batch, neighbour, neighbour_index

    caps = [
        "a red square at the top",
        "a blue square at the top",
        "a red circle at the top",
        "a red square at the left",
        "a big green bar",
        "a red square at the top",
    ]
    index = neighbour_index(caps)
    rng = np.random.default_rng(0)
    for _ in range(20):
        j = neighbour(0, caps, index, rng)
        assert j in (1, 2, 3)  # never item 5 (the same caption) nor item 4 (three words differ)
    assert neighbour(4, caps, index, rng) is None
    grid = [
        f"a {c} {s} at the {p}"
        for c in ("red", "blue", "green", "cyan", "pink", "grey")
        for s in ("square", "bar", "disc", "ring", "star")
        for p in ("top", "left", "centre")
    ]
    gindex = neighbour_index(grid)

    def one_word_pairs(hard: float) -> float:
        hits = 0
        for seed in range(50):
            idx = draw_batch(len(grid), 8, np.random.default_rng(seed), grid, gindex, hard)
            assert len(set(idx.tolist())) == 8
            hits += sum(
                sum(x != y for x, y in zip(grid[a].split(), grid[b].split())) == 1 for a, b in idx.reshape(4, 2)
            )
        return hits / 200

    # a neighbour drawn that is already half of an earlier pair stays there: a rare miss
    assert one_word_pairs(1.0) > 0.95 and one_word_pairs(0.0) < 0.3  # 11 of 89 others are neighbours


def test_sample_cli_open_clip_reranker(tiny_models, tmp_path, capsys):
    """`dalle-ds sample --open-clip CONFIG:CHECKPOINT` with the tiny open_clip fixture (tests/data/open_clip;
    its equality with open_clip itself is tests/sampling/test_open_clip.py): kept scores are the best per caption."""
    from dalle_ds.cli.sample import main

    data = Path(__file__).resolve().parents[1] / "data" / "open_clip"
    main(
        [
            "--prior",
            tiny_models["prior"],
            "--dvae",
            tiny_models["dvae"],
            "--caption",
            "a red square",
            "--caption",
            "a blue circle",
            "--candidates",
            "3",
            "--keep",
            "2",
            "--open-clip",
            f"{data / 'tiny.json'}:{data / 'tiny.pt'}",
            "--out",
            str(tmp_path / "s.png"),
        ]
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["count"] == 4 and all(-1 <= s <= 1 for s in out["scores"])
    assert out["scores"][0] >= out["scores"][1] and out["scores"][2] >= out["scores"][3]
    assert (tmp_path / "s.png").exists()


def test_sample_cli_candidates_keep_and_prime(tiny_models, tmp_path, capsys):
    from PIL import Image

    from dalle_ds.cli.sample import main

    img = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(img)
    main(
        [
            "--prior",
            tiny_models["prior"],
            "--dvae",
            tiny_models["dvae"],
            "--caption",
            "a red square",
            "--caption",
            "a blue circle",
            "--candidates",
            "4",
            "--keep",
            "2",
            "--clip",
            tiny_models["clip"],
            "--prime-image",
            str(img),
            "--prime-rows",
            "1",
            "--out",
            str(tmp_path / "s.png"),
        ]
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["count"] == 4 and len(out["scores"]) == 4
    assert out["scores"][0] >= out["scores"][1] and out["scores"][2] >= out["scores"][3]
    assert (tmp_path / "s.png").exists()
    with pytest.raises(SystemExit):
        main(
            [
                "--prior",
                tiny_models["prior"],
                "--dvae",
                tiny_models["dvae"],
                "--caption",
                "x",
                "--candidates",
                "2",
                "--keep",
                "3",
                "--clip",
                tiny_models["clip"],
            ]
        )


def test_eval_cli_writes_json_and_plot(tiny_models, tmp_path):
    """`dalle-ds eval` on the tiny model: FID per radius, contrastive scores, composition with/without rerank."""
    from dalle_ds.cli import main

    main(
        [
            "eval",
            "--prior",
            tiny_models["prior"],
            "--dvae",
            tiny_models["dvae"],
            "--clip",
            tiny_models["clip"],
            "--n",
            "3",
            "--radii",
            "0",
            "--heldout",
            "2",
            "--candidates",
            "2",
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    r = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(r["fid"]) == {"0"} and all(v >= 0 for v in r["fid"].values())
    assert -1 <= r["mean_contrastive_score"] <= 1 and r["n_fake"] == 3
    comp = r["heldout_composition"]
    assert comp["unreranked"]["n"] == 4 and comp["reranked_top1"]["n"] == 2
    assert (tmp_path / "ev" / "fid_blur.png").stat().st_size > 500


def test_sample_cli_bf16_prior_with_reranker_and_prime(tiny_models, tmp_path, capsys):
    """--device cpu --dtype bf16: the prior's weights in bf16 through priming, decoding and reranking; the
    picture grid and scores come out as in fp32. --dtype fp16 on the CPU is refused, naming the option."""
    from PIL import Image

    from dalle_ds.cli.sample import main
    from dalle_ds.config import ConfigError

    img = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(img)
    argv = ["--prior", tiny_models["prior"], "--dvae", tiny_models["dvae"], "--caption", "a red square"]
    argv += ["--candidates", "3", "--keep", "2", "--clip", tiny_models["clip"], "--prime-image", str(img)]
    argv += ["--device", "cpu", "--out", str(tmp_path / "s.png")]
    main([*argv, "--dtype", "bf16"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["count"] == 2 and out["scores"][0] >= out["scores"][1]
    assert Image.open(tmp_path / "s.png").size[0] > 0
    with pytest.raises(ConfigError, match="--dtype fp16 on the CPU"):
        main([*argv, "--dtype", "fp16"])
