"""Turn the npm emoji image packages into the `folder` layout (NNNN.png + NNNN.txt, `train/` and `val/`).

The real-data benchmark (`make realdata`, dalle_ds/demo/real.py) trains on pictures of objects: the emoji of
the categories Animals & Nature, Food & Drink, Objects, Travel & Places and Activities (no people, flags or
symbols), drawn on white, captioned from their Unicode CLDR names ("a red apple", "grapes").

Sources, installed from the package registries only (the Makefile's `realdata` target):

* npm `emoji-datasource-twitter@16.0.0`: Twemoji by Twitter / jdecked, images CC-BY 4.0
  (https://github.com/jdecked/twemoji); the package's data and code MIT (Cal Henderson, iamcal/emoji-data).
* npm `emoji-datasource-google@16.0.0`: Noto Emoji by Google, images Apache-2.0
  (https://github.com/googlefonts/noto-emoji); package MIT.
* PyPI `emoji` (BSD): the CLDR names, `emoji.EMOJI_DATA[ch]["en"]` (":red_apple:").

CC-BY asks for attribution: the prepared folder gets an ATTRIBUTION.txt saying where each style comes from.
Each package contributes about 857 64x64 RGBA pictures; the two styles together 1,714. The split is fixed
by a hash of (style, code point), so the two styles of one emoji fall on either side independently: 228 of
the 256 held-out captions also caption a train picture (the object in the other style), 28 name an object
never seen (the benchmark reports both groups). A CRC was used before: CRC32 is linear, so keys that differ only in the
style prefix sorted together and 178 of 256 held-out pictures were objects whose both styles were held out.

    python -m dalle_ds.data.prepare_emoji PKG_DIR [PKG_DIR ...] --out DIR [--size 32] [--val 256]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import unicodedata
from pathlib import Path

from PIL import Image

CATEGORIES = ("Animals & Nature", "Food & Drink", "Objects", "Travel & Places", "Activities")

ATTRIBUTION = {
    "twitter": "Twemoji by Twitter, Inc. and other contributors (jdecked/twemoji), CC-BY 4.0",
    "google": "Noto Emoji by Google (googlefonts/noto-emoji), Apache-2.0",
}

# Names that read as plurals or mass nouns take no article ("grapes", not "a grapes"). A name ending in
# "s" is taken as plural unless it ends in -ss/-us/-os or its head noun comes before "with"/"over"/... .
_SINGULAR_S = ("ss", "us", "os")
_HEAD_BREAKS = (" with ", " over ", " behind ", " showing ", " at ", " in ", " on ", " of ")
_NO_ARTICLE = {"foggy", "cooking", "bowling", "camping", "money with wings", "tennis"}


def caption_for(name: str) -> str:
    """A CLDR emoji name ("red apple", "grapes", "piñata") -> a caption ("a red apple", "grapes", "a pinata").
    Accents are folded: the English caption filter drops words outside ASCII, and with them the picture."""
    name = unicodedata.normalize("NFKD", name.replace("\u2019", "'"))
    name = "".join(c for c in name if not unicodedata.combining(c))
    name = " ".join(name.replace("_", " ").lower().split())
    if name in _NO_ARTICLE:
        return name
    head = name
    for brk in _HEAD_BREAKS:
        head = head.split(brk)[0]
    plural = head.endswith("s") and not head.endswith(_SINGULAR_S)
    if plural:
        return name
    return ("an " if name[0] in "aeiou" else "a ") + name


def emoji_name(entry: dict) -> str:
    """The CLDR name from the `emoji` package, else the package's own name."""
    import emoji  # noqa: PLC0415 - only this preparation step needs it (requirements.txt)

    ch = "".join(chr(int(h, 16)) for h in entry["unified"].split("-"))
    data = emoji.EMOJI_DATA.get(ch) or emoji.EMOJI_DATA.get(ch.replace("\ufe0f", ""))
    return data["en"].strip(":") if data else entry["name"]


def vendor_of(pkg: Path) -> str:
    """'twitter' for an unpacked emoji-datasource-twitter (from package.json, else the single img/ folder)."""
    meta = pkg / "package.json"
    if meta.is_file():
        return json.loads(meta.read_text())["name"].rsplit("-", 1)[1]
    found = [p.name for p in (pkg / "img").iterdir() if p.is_dir()] if (pkg / "img").is_dir() else []
    if len(found) != 1:
        raise ValueError(f"{pkg}: not an unpacked emoji-datasource package (no package.json, img/<style>/)")
    return found[0]


def on_white(path: Path, size: int) -> Image.Image:
    """RGBA picture -> RGB on a white background, resized to size x size."""
    src = Image.open(path).convert("RGBA")
    img = Image.alpha_composite(Image.new("RGBA", src.size, (255, 255, 255, 255)), src).convert("RGB")
    return img if img.size == (size, size) else img.resize((size, size), Image.LANCZOS)


def collect(pkg: Path) -> tuple[str, list[tuple[str, Path, str]]]:
    """(style, [(key, image path, caption)]) of the kept categories; missing pictures are left out."""
    vendor = vendor_of(pkg)
    items = []
    for e in json.loads((pkg / "emoji.json").read_text()):
        if e.get("category") not in CATEGORIES or not e.get(f"has_img_{vendor}"):
            continue
        path = pkg / "img" / vendor / "64" / e["image"]
        if path.is_file():
            items.append((f"{vendor}/{e['unified']}", path, caption_for(emoji_name(e))))
    return vendor, items


def split_key(key: str) -> bytes:
    """The fixed shuffle's sort key of "style/CODE": independent of input order, and (a cryptographic hash,
    not a CRC) unrelated between the two styles of one emoji."""
    return hashlib.sha256(key.encode()).digest()


def prepare(packages: list[str | Path], out: str | Path, *, size: int = 32, val: int = 256) -> dict:
    """Write out/{train,val}/NNNN.png + NNNN.txt; `val` pictures (by a hash of style and code) are held out."""
    out = Path(out)
    styles, items = [], []
    for pkg in packages:
        vendor, found = collect(Path(pkg))
        styles.append(vendor)
        items += found
    if not items:
        raise ValueError(f"no pictures of the kept categories found in {', '.join(map(str, packages))}")
    items.sort(key=lambda it: split_key(it[0]))
    val = min(val, len(items) // 2)
    counts = {}
    for split, part in (("val", items[:val]), ("train", items[val:])):
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        for n, (_, path, caption) in enumerate(sorted(part, key=lambda it: it[0])):
            on_white(path, size).save(d / f"{n:04d}.png")
            (d / f"{n:04d}.txt").write_text(caption + "\n")
        counts[split] = len(part)
    lines = [ATTRIBUTION.get(s, f"{s}: see the emoji-datasource-{s} package's licence") for s in styles]
    (out / "ATTRIBUTION.txt").write_text(
        "Pictures: " + "; ".join(lines) + ".\nCaptions: Unicode CLDR names via the PyPI package emoji (BSD).\n"
    )
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("packages", nargs="+", help="unpacked emoji-datasource-<style> package folders")
    p.add_argument("--out", required=True, help="output folder (gets train/, val/, ATTRIBUTION.txt)")
    p.add_argument("--size", type=int, default=32, help="pixels per side (default 32)")
    p.add_argument("--val", type=int, default=256, help="held-out pictures (default 256, the FID's minimum)")
    args = p.parse_args(argv)
    counts = prepare(args.packages, args.out, size=args.size, val=args.val)
    print(f"{args.out}: {counts['train']} train, {counts['val']} val pairs")


if __name__ == "__main__":
    main()
