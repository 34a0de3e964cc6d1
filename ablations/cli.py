"""The `tafm` command line.

User errors (a bad key, value, path) end in one line `tafm: error: ...` and exit status 2;
set TAFM_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional


def _cmd_cost(args: argparse.Namespace) -> int:
    from ablations.cost_table import cost_tables, format_cost, model_cost

    if args.table:
        print(cost_tables())
        return 0
    cost = model_cost(args.set)
    print(json.dumps(cost.as_dict(), indent=2) if args.json else format_cost(cost))
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from datamodules.synthetic import SynthConfig, generate

    fields = {k: getattr(args, k) for k in ("videos", "frames", "size", "seed") if getattr(args, k) is not None}
    out = generate(Path(args.out), SynthConfig(**fields), progress=True)
    print(f"synthetic VID dataset in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tafm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cost = commands.add_parser("cost", help="count parameters and multiply-adds (fvcore), as the paper counts them")
    cost.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key, e.g. --set model.alpha=0.5 (repeatable)")
    cost.add_argument("--json", action="store_true", help="print {params, macs, input_size, components} as JSON")
    cost.add_argument("--table", action="store_true", help="print the paper's cost columns (Tables 3-5) beside ours")
    cost.set_defaults(func=_cmd_cost)

    data = commands.add_parser("data", help="datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    synth = data_commands.add_parser("synth", help="write the synthetic benchmark in the ILSVRC2015 VID layout")
    synth.add_argument("out", help="output folder")
    synth.add_argument("--videos", type=int, help="number of training videos")
    synth.add_argument("--frames", type=int, help="frames per video")
    synth.add_argument("--size", type=int, help="image side in pixels")
    synth.add_argument("--seed", type=int, help="random seed (the dataset is deterministic from it)")
    synth.set_defaults(func=_cmd_data_synth)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        if os.environ.get("TAFM_DEBUG"):
            raise
        print(f"tafm: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `tafm cost --json | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("tafm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
