"""`dalle-ds plan`: will the prior fit, and what crosses the network, before renting the cluster.

    dalle-ds plan --preset 12b --hostfile hostfiles/v100 [--ds-config FILE] [--gpu-memory GB] [--json FILE]
    dalle-ds plan --preset 12b --hostfile hostfiles/a100 --ds-config ds_configs/gpu_zero3_bf16_12b.json

The accounting is described in dalle_ds/training/plan.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dalle_ds.cli.common import run_command
from dalle_ds.config import ConfigError
from dalle_ds.training.plan import format_report, plan


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="12b")
    p.add_argument("--hostfile", default="hostfiles/v100")
    p.add_argument("--ds-config", default=None, help="a ds_configs/*.json (default: ZeRO-3, micro-batch 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        metavar="GB",
        help="memory per GPU in GB (1e9 bytes); default: the hostfile's `# gpu_memory_gb:` line, else 16 (V100)",
    )
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    ds = None
    if args.ds_config:
        try:
            ds = json.loads(Path(args.ds_config).read_text())
        except FileNotFoundError:
            raise ConfigError(f"--ds-config: {args.ds_config} does not exist") from None
    report = plan(args.preset, args.hostfile, ds, overrides=args.overrides, gpu_memory_gb=args.gpu_memory)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    run_command("plan", main)
