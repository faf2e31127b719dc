"""`dalle-ds export`: a consolidated model folder that loads and samples without DeepSpeed.

    dalle-ds export --run runs/prior --out runs/prior/export            # latest DeepSpeed checkpoint
    dalle-ds export --run runs/prior --out runs/prior/export-ema --ema  # the EMA weights (from prior.pt)

Writes `model.safetensors` (fp32, consolidated from the ZeRO shards with DeepSpeed's own zero_to_fp32),
`config.json` (the full experiment config the model was built from) and `tokenizer.json`.
`dalle_ds.train_prior.load_prior(folder)` and `dalle-ds sample --prior folder` read it back.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dalle_ds.config import ConfigError, from_dict

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def checkpoint_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a DeepSpeed checkpoint folder (any ZeRO stage), on CPU, one process."""
    ckpt_dir = Path(ckpt_dir)
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.exists():
            raise FileNotFoundError(f"{ckpt_dir}: no `latest` file; train first or pass --tag")
        tag = latest.read_text().strip()
    folder = ckpt_dir / tag
    if any(folder.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # ZeRO stage 0: the module is saved whole by rank 0
        state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def write_export(out: str | Path, state_dict: dict[str, torch.Tensor], config: dict, tokenizer_json: str) -> Path:
    """Write the three files into `out` (each atomically)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS)
    for name, text in ((CONFIG, json.dumps(config, indent=1)), (TOKENIZER, tokenizer_json)):
        (out / (name + ".tmp")).write_text(text)
        os.replace(out / (name + ".tmp"), out / name)
    return out


def is_export(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / WEIGHTS).exists()


def read_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    from safetensors.torch import load_file  # noqa: PLC0415

    path = Path(path)
    return load_file(str(path / WEIGHTS)), json.loads((path / CONFIG).read_text()), (path / TOKENIZER).read_text()


def export_run(run: str | Path, out: str | Path, *, ema: bool = False, tag: str | None = None) -> Path:
    run = Path(run)
    if ema:
        payload = torch.load(run / "prior.pt", map_location="cpu", weights_only=False) \
            if (run / "prior.pt").exists() else {}
        if "ema_state_dict" not in payload:
            raise ConfigError(f"--ema: {run}/prior.pt has no EMA weights (train with prior_train.ema_decay > 0 "
                              "to the end)")
        return write_export(out, payload["ema_state_dict"], payload["config"], payload["tokenizer"])
    if not (run / CONFIG).exists() or not (run / TOKENIZER).exists():
        raise ConfigError(f"--run: {run} has no {CONFIG}/{TOKENIZER}; point it at a train-prior --out folder")
    state = checkpoint_state_dict(run / "checkpoints", tag)
    config = json.loads((run / CONFIG).read_text())
    from_dict(config)  # validate before writing
    return write_export(out, state, config, (run / TOKENIZER).read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a train-prior --out folder (checkpoints/, config.json, tokenizer.json)")
    p.add_argument("--out", required=True, help="folder to write model.safetensors, config.json, tokenizer.json")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one `latest` names)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (from the run's prior.pt)")
    args = p.parse_args(argv)
    out = export_run(args.run, args.out, ema=args.ema, tag=args.tag)
    print(f"export: {out}/{WEIGHTS}")


if __name__ == "__main__":
    main()
