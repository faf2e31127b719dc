"""`dalle-ds import-dvae`: OpenAI's released dVAE weights as a dvae.pt, so stage 1 can be skipped.

    dalle-ds import-dvae --openai encoder.pkl decoder.pkl --out runs/dvae/dvae.pt

ENCODER and DECODER are OpenAI's `encoder.pkl` / `decoder.pkl` (whole pickled modules; read by a restricted
unpickler that never imports `dall_e` nor runs code from the file) or state dicts of those modules
(`torch.save(enc.state_dict(), ...)`). Only the weights are used; see dalle_ds/dvae/openai.py. The dvae.pt
written holds the paper preset's config with the dVAE read from the weights (for the release: the paper's
256 px, 8192 codes, n_hid 256, 4 groups x 2 blocks) and loads wherever a trained dvae.pt does
(`--dvae` of encode, train-prior's data, sample, eval).
"""

from __future__ import annotations

import argparse

from dalle_ds.cli.common import argument, existing_path, run_command
from dalle_ds.dvae.io import save_dvae
from dalle_ds.dvae.openai import OPENAI_IMAGE_SIZE, is_paper_config, load_openai_dvae, openai_experiment_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="dalle-ds import-dvae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--openai",
        nargs=2,
        required=True,
        metavar=("ENCODER", "DECODER"),
        help="OpenAI's encoder.pkl and decoder.pkl, or state dicts of those modules",
    )
    p.add_argument("--out", required=True, help="the dvae.pt to write")
    p.add_argument(
        "--image-size",
        type=int,
        default=OPENAI_IMAGE_SIZE,
        help=f"pixels per side the dVAE is used at (not stored in the weights; the release: {OPENAI_IMAGE_SIZE})",
    )
    args = p.parse_args(argv)
    encoder_path, decoder_path = (existing_path(f, "--openai") for f in args.openai)
    with argument("--openai"):
        model = load_openai_dvae(encoder_path, decoder_path, image_size=args.image_size)
    cfg = openai_experiment_config(model.cfg)
    save_dvae(args.out, model.state_dict(), cfg, step=0)
    d = model.cfg
    n_enc = sum(t.numel() for t in model.encoder.parameters())
    n_dec = sum(t.numel() for t in model.decoder.parameters())
    which = "the paper config" if is_paper_config(d) else "not the paper config"
    print(
        f"import-dvae: OpenAI dVAE ({which}: {d.image_size} px, {d.vocab_size} codes on a {d.grid_size}x"
        f"{d.grid_size} grid, n_hid {d.n_hid}, {d.n_blk_per_group} blocks/group; encoder {n_enc:,} + decoder "
        f"{n_dec:,} parameters) -> {args.out}"
    )


if __name__ == "__main__":
    run_command("import-dvae", main)
