"""Writes the open_clip fixture used by tests/sampling/test_open_clip.py: two tiny random open_clip models
(their configs and checkpoints) and what open_clip itself computes with them.

dalle_ds cannot import open_clip (torch 2.13.0 CPU has no working torchvision), so this runs once, in a
separate venv where open_clip works, e.g. on x86_64 Python 3.11:
    python -m venv /tmp/ocref && /tmp/ocref/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        open_clip_torch==3.3.0 pillow==13.0.0 numpy==2.4.6 regex==2026.9.29 ftfy==6.3.1
    /tmp/ocref/bin/python tests/data/open_clip/make_fixture.py
Outputs (next to this file): tiny.json + tiny.pt (a built-in-style config, ARCH:CHECKPOINT form),
variant/ (open_clip_config.json + open_clip_model.safetensors, the hub folder form: QuickGELU, layer scale,
mlp_ratio, custom_text + biased text projection, own mean/std, bilinear), reference.pt.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
TINY = {"embed_dim": 8,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 16, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 2}}
VARIANT = {"model_cfg": {"embed_dim": 6, "quick_gelu": True, "custom_text": True,
                         "vision_cfg": {"image_size": 24, "layers": 2, "width": 12, "head_width": 4, "patch_size": 6,
                                        "mlp_ratio": 2.0, "ls_init_value": 0.5},
                         "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 4, "heads": 2, "layers": 1,
                                      "proj_bias": True}},
           "preprocess_cfg": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}}
CAPTIONS = ["a small red triangle at the top left", "A BLUE Circle,   in the middle!", "it’s a “green” square",
            "two cats & 3 dogs", "naïve café déjà vu", "an extremely long caption that goes on and on and on "
            "well past the sixteen token context of the tiny model so it must be truncated"]
TOKENIZER_CASES = CAPTIONS + [
    "", "   ", "Hello, World!!!", "they're here; we'll see 'em, I'd say", "don't won't can't shouldn't've",
    "photographed on 2014-06-03 IMG_1234.JPG", "x²+y³ = z½ and 1,000,000 dollars", "日本語のテキスト", "emoji 🐱🐶 test",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &amp;amp;", "Ünïcödé ÀÉÎÕÜ ß ﬁ ligature", "tabs\tand\nnewlines\r\nhere",
    "<start_of_text> literal specials <end_of_text>", "under_score and-hyphen and.dot", "mojibake: cafÃ© donâ€™t",
    "ＦＵＬＬＷＩＤＴＨ text", "a" * 60, "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(["word"] * 90), "«quoted» ‹text› „german“ ‚quotes‘", "Ελληνικά русский عربي हिन्दी", "123456789 0.5 -7",
]


def randomise(model, gen):
    """Every parameter random (not open_clip's zero biases / unit norms), so each one matters in the check."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight",
                                         "ln_final.weight")) else 0.0
            scale = 0.3 if p.dim() < 2 else p.float().std().clamp_min(0.05).item()
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))


def reference(model, preprocess, tokenizer, images, captions):
    x = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    ids = tokenizer(captions)
    with torch.no_grad():
        zi, zt = model.encode_image(x), model.encode_text(ids)
    return {"pixels": x, "ids": ids, "image_features": zi, "text_features": zt,
            "scores": (torch.nn.functional.normalize(zi, dim=-1) * torch.nn.functional.normalize(zt, dim=-1)).sum(-1)}


def main():
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 40, 48, 3), dtype=np.uint8)  # wider than tall: resize + centre crop
    out = {"images": torch.from_numpy(images), "captions": CAPTIONS, "tokenizer_cases": TOKENIZER_CASES,
           "tokenizer_ids": open_clip.tokenize(TOKENIZER_CASES), "versions": {
               "open_clip": open_clip.__version__, "torch": str(torch.__version__)}}
    # Preprocessing alone, on sizes that exercise both orientations, odd crops and no-resize.
    shapes = [(32, 32), (31, 57), (90, 33), (17, 17), (64, 48)]
    out["pre_images"] = [torch.from_numpy(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in shapes]

    (HERE / "tiny.json").write_text(json.dumps(TINY, indent=2) + "\n")
    open_clip.add_model_config(HERE / "tiny.json")
    model = open_clip.create_model("tiny")
    randomise(model, gen)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, HERE / "tiny.pt")
    model, _, pre = open_clip.create_model_and_transforms("tiny", pretrained=str(HERE / "tiny.pt"))
    model.eval()
    out["tiny"] = reference(model, pre, open_clip.get_tokenizer("tiny"), images, CAPTIONS)
    out["tiny"]["pre_pixels"] = [pre(Image.fromarray(im.numpy())) for im in out["pre_images"]]

    vdir = HERE / "variant"
    shutil.rmtree(vdir, ignore_errors=True)
    vdir.mkdir()
    (vdir / "open_clip_config.json").write_text(json.dumps(VARIANT, indent=2) + "\n")
    model = open_clip.create_model(f"local-dir:{vdir}")
    randomise(model, gen)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, vdir / "open_clip_model.safetensors")
    model, _, pre = open_clip.create_model_and_transforms(f"local-dir:{vdir}")
    model.eval()
    assert type(model).__name__ == "CustomTextCLIP"
    out["variant"] = reference(model, pre, open_clip.get_tokenizer(f"local-dir:{vdir}"), images, CAPTIONS)
    out["variant"]["pre_pixels"] = [pre(Image.fromarray(im.numpy())) for im in out["pre_images"]]
    # A real built-in config: parameter names and shapes open_clip gives ViT-B-32 (no weights needed).
    out["vit_b_32_shapes"] = {k: list(v.shape) for k, v in open_clip.create_model("ViT-B-32").state_dict().items()}
    torch.save(out, HERE / "reference.pt")
    print({k: round(v.stat().st_size / 1e3) for k, v in
           [("tiny.pt", HERE / "tiny.pt"), ("reference.pt", HERE / "reference.pt"),
            ("variant", vdir / "open_clip_model.safetensors")]}, "kB")


if __name__ == "__main__":
    main()
