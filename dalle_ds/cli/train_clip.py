"""`dalle-ds train-clip`: train the small contrastive image-text model used to rerank samples.

    dalle-ds train-clip --preset shapes --out runs/clip

Writes out/clip.pt (config + weights + tokenizer) and out/clip_metrics.json.
"""

from __future__ import annotations

import argparse
import json

from dalle_ds.cli.common import add_config_args, config_from_args
from dalle_ds.rerank.train import train_clip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", required=True, help="run folder: clip.pt, clip_metrics.json")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of training one")
    args = p.parse_args(argv)
    s = train_clip(config_from_args(args), args.out, tokenizer_path=args.tokenizer)
    print(json.dumps({k: v for k, v in s.items() if k != "history"}))


if __name__ == "__main__":
    main()
