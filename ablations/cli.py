"""The `tafm` command line.

User errors (a bad key, value, path) end in one line `tafm: error: ...` and exit status 2;
set TAFM_DEBUG=1 to see the traceback instead. `tafm run` checks the suite, the overrides, the
storage and the data root before it imports the training stack or opens the study.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional


def _cmd_cost(args: argparse.Namespace) -> int:
    from ablations.extras.cost_table import cost_tables, format_cost, model_cost

    if args.table:
        print(cost_tables())
        return 0
    cost = model_cost(args.set)
    print(json.dumps(cost.as_dict(), indent=2) if args.json else format_cost(cost))
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from datamodules.synthetic import SynthConfig, generate

    fields = {k: getattr(args, k) for k in ("videos", "val_videos", "frames", "size", "seed", "cue_prob",
                                            "marker_width", "marker_blend", "marker_style")
              if getattr(args, k) is not None}
    out = generate(Path(args.out), SynthConfig(**fields), progress=True)
    print(f"synthetic VID dataset in {out}")
    return 0


def _cmd_suites(args: argparse.Namespace) -> int:
    from ablations.suite import available_suites, load_suite

    for name in available_suites():
        suite = load_suite(name)
        size = f"{suite.search['trials']} TPE trials" if suite.search else f"{len(suite.points)} grid points"
        print(f"{name:<20} {suite.description} [{size}]")
    return 0


def _request(args: argparse.Namespace):
    from ablations.pipeline import SuiteRequest

    return SuiteRequest(args.suite, list(args.set), args.seeds, args.storage, getattr(args, "workers", 1),
                        Path(args.runs_dir), args.profile, getattr(args, "data_root", None),
                        getattr(args, "wandb", None), Path(getattr(args, "report_dir", "reports")), args.max_trials,
                        getattr(args, "verbose", False))


def _cmd_run(args: argparse.Namespace) -> int:
    from ablations.pipeline import run_request, unfinished

    request = _request(args)
    run_request(request, worker_only=args.worker_only)
    if args.worker_only:
        return 0
    missing = unfinished(request)
    if missing and request.max_trials is None:
        print(f"tafm: error: {missing}", file=sys.stderr)
        return 1
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from collections import Counter

    from ablations.preflight import check_seeds, check_storage
    from ablations.suite import load_suite

    check_seeds(args.seeds)
    suite = load_suite(args.suite)
    check_storage(args.storage)
    from ablations.harness import grid_keys, open_study, records_frame
    from ablations.pipeline import run_options

    options = run_options(_request(args))
    study = open_study(suite, options)
    states = Counter(t.state.name for t in study.get_trials(deepcopy=False) if "key" in t.user_attrs)
    total = suite.search["trials"] if suite.search else len(grid_keys(suite, options))
    done = states.get("COMPLETE", 0) + states.get("PRUNED", 0)
    print(f"{suite.name} ({options.profile}): {done}/{total} done; " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(states.items())))
    frame = records_frame(study)
    if len(frame):
        columns = [c for c in frame.columns if c.startswith("axis.")] + ["value", "wall_time_s"]
        print(frame[["key", *columns]].to_string(index=False))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ablations.pipeline import report_suites
    from ablations.suite import available_suites
    from ablations.tracking import resolve_mode

    mode = resolve_mode(args.wandb)
    if not args.all and not args.suite:
        raise ValueError("tafm report: name a SUITE or pass --all")
    names = available_suites() if args.all else [args.suite]
    report_suites(names, Path(args.runs_dir), Path(args.out_dir), mode, every=args.all)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ablations.config import load_config
    from datamodules.vid import CLASS_NAMES
    from lightning_modules.deploy.export import export_model, load_checkpoint
    from lightning_modules.network import create_model

    if args.checkpoint:
        net, cfg = load_checkpoint(args.checkpoint)
    else:
        import torch

        torch.manual_seed(args.seed)
        cfg = load_config(args.set).model
        net = create_model(cfg).eval()
        print("no CHECKPOINT: exporting a random-init network of the config (fine for latency, not for accuracy)")
    names = list(CLASS_NAMES) if cfg.num_classes == len(CLASS_NAMES) else None
    result = export_model((net, cfg), args.out, args.format, parity_frames=args.parity_frames, box_tol=args.box_tol,
                          score_tol=args.score_tol, class_names=names, check=not args.no_check, seed=args.seed)
    print(result.format())
    return 0


def _cmd_latency(args: argparse.Namespace) -> int:
    pin = None if args.no_pin else args.pin_core
    if args.table7:
        from ablations.extras.latency_table import table7

        print(table7(args.format, args.out_dir, args.frames, args.warmup, args.threads, pin).format())
        return 0
    if not args.model:
        raise ValueError("tafm latency: name an exported MODEL (.pte or .onnx) or pass --table7")
    from lightning_modules.deploy.export import format_of
    from lightning_modules.deploy.latency import measure_latency, measure_peak

    peak = None if args.no_peak else measure_peak(format_of(args.model), args.threads, pin)
    result = measure_latency(args.model, args.frames, args.warmup, args.threads, pin, peak)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.format())
    return 0


def _cmd_viz(args: argparse.Namespace) -> int:
    from ablations.extras.pictures import draw_checkpoints

    for checkpoint in args.checkpoints:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"tafm viz: checkpoint {checkpoint} does not exist (a .ckpt written by training, "
                                    f"e.g. runs/_stages/<hash>/checkpoints/last.ckpt)")
    path = draw_checkpoints(args.checkpoints, args.out, root=args.data_root, video=args.video, frames=args.frames,
                            start=args.start, occlusion=args.occlusion, min_score=args.min_score, scale=args.scale)
    print(f"wrote {path}")
    return 0


def _suite_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", help="a suite name (tafm suites) or a suite YAML path")
    parser.add_argument("--runs-dir", default="runs", help="where studies, records and checkpoints go (default: runs)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL (default sqlite:///runs/<suite>/optuna.db); postgresql://... lets "
                             "workers on many machines share one study")
    parser.add_argument("--profile", default="synthetic", choices=["synthetic", "vid"],
                        help="synthetic benchmark at CPU scale (default) or ImageNet VID at the paper's settings")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per grid point (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--max-trials", type=int, default=None, help="stop this worker after N trials")


def build_parser() -> argparse.ArgumentParser:
    from lightning_modules.deploy.formats import EXPORT_FORMATS  # no torch: the formats' names only

    parser = argparse.ArgumentParser(prog="tafm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cost = commands.add_parser("cost", help="count parameters and multiply-adds (fvcore), as the paper counts them")
    cost.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key, e.g. --set model.alpha=0.5 (repeatable)")
    cost.add_argument("--json", action="store_true", help="print {params, macs, input_size, components} as JSON")
    cost.add_argument("--table", action="store_true", help="print the paper's cost columns (Tables 3-5) beside ours")
    cost.set_defaults(func=_cmd_cost)

    suites = commands.add_parser("suites", help="list the ablation suites")
    suites.set_defaults(func=_cmd_suites)

    run = commands.add_parser("run", help="run (or resume) an ablation suite")
    _suite_arguments(run)
    run.add_argument("--wandb", choices=["offline", "online", "disabled"], default=None,
                     help="W&B mode (default: $WANDB_MODE, else offline)")
    run.add_argument("--data-root", default=None, help="ImageNet VID root (default: the synthetic benchmark)")
    run.add_argument("--report-dir", default="reports", help="where the suite's report is written (default: reports)")
    run.add_argument("--workers", type=int, default=1,
                     help="trials run at once on this machine, each in its own process (default 1; 2 uses both "
                          "cores of a 2-core laptop, since each training stage runs on one thread)")
    run.add_argument("--verbose", action="store_true",
                     help="show every library message (exporter and Lightning warnings, C++ output) instead of "
                          "sending them to runs/<suite>/libraries.log")
    run.add_argument("--worker-only", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(func=_cmd_run)

    status = commands.add_parser("status", help="progress and records of a suite")
    _suite_arguments(status)
    status.set_defaults(func=_cmd_status)

    report = commands.add_parser("report", help="regenerate a suite's paper table from its records")
    report.add_argument("suite", nargs="?", help="suite name")
    report.add_argument("--all", action="store_true", help="every suite with records, plus an index")
    report.add_argument("--runs-dir", default="runs", help="where the suites' records are (default: runs)")
    report.add_argument("--report-dir", "--out-dir", dest="out_dir", default="reports",
                        help="where reports go (default: reports; the same option as `tafm run`'s)")
    report.add_argument("--wandb", choices=["offline", "online", "disabled"], default=None,
                        help="also log the table (and plots) to W&B (default: $WANDB_MODE, else offline)")
    report.set_defaults(func=_cmd_report)

    export = commands.add_parser("export", help="export a one-frame stateful model (ExecuTorch .pte or ONNX) with a parity check")
    export.add_argument("checkpoint", nargs="?", help="a training checkpoint (.ckpt) or a plain tafm checkpoint; "
                                                      "omit to export a random-init network of --set")
    export.add_argument("--out", required=True, help="output file (.pte or .onnx); a .json sidecar is written beside it")
    export.add_argument("--format", choices=list(EXPORT_FORMATS), default="executorch")
    export.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config without CHECKPOINT")
    export.add_argument("--parity-frames", type=int, default=20, help="frames of the eager-vs-exported parity clip")
    export.add_argument("--box-tol", type=float, default=1e-3)
    export.add_argument("--score-tol", type=float, default=1e-3)
    export.add_argument("--no-check", action="store_true", help="skip the parity check")
    export.add_argument("--seed", type=int, default=0)
    export.set_defaults(func=_cmd_export)

    latency = commands.add_parser("latency", help="single-thread latency of an exported model, or paper Table 7")
    latency.add_argument("model", nargs="?", help="an exported .pte or .onnx (from tafm export)")
    latency.add_argument("--table7", action="store_true", help="export and time paper Table 7's models")
    latency.add_argument("--format", choices=list(EXPORT_FORMATS), default="executorch", help="runtime for --table7")
    latency.add_argument("--out-dir", default=None, help="keep --table7's exported models here")
    latency.add_argument("--frames", type=int, default=200, help="timed frames (default 200)")
    latency.add_argument("--warmup", type=int, default=20)
    latency.add_argument("--threads", type=int, default=1)
    latency.add_argument("--pin-core", type=int, default=0, help="core to pin to (default 0)")
    latency.add_argument("--no-pin", action="store_true")
    latency.add_argument("--no-peak", action="store_true", help="skip the single-core peak (roofline) measurement")
    latency.add_argument("--json", action="store_true")
    latency.set_defaults(func=_cmd_latency)

    viz = commands.add_parser("viz", help="draw ground truth and detections of checkpoints side by side on consecutive "
                                          "val frames (paper Figure 5)")
    viz.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="training checkpoints (.ckpt), one column each")
    viz.add_argument("--out", required=True, help="FILE.png (frames top to bottom), .gif or .mp4 (needs imageio-ffmpeg)")
    viz.add_argument("--video", default=None, help="val video name or index (default: the first)")
    viz.add_argument("--frames", type=int, default=8, help="consecutive frames (default 8)")
    viz.add_argument("--start", type=int, default=0, help="first frame's position in the video (default 0)")
    viz.add_argument("--occlusion", type=float, default=0.0, help="occlude boxes with this probability, as the "
                                                                  "evaluation does (paper Table 6)")
    viz.add_argument("--min-score", type=float, default=0.3, help="draw detections scoring at least this (default 0.3)")
    viz.add_argument("--scale", type=int, default=3, help="enlarge frames this many times (default 3)")
    viz.add_argument("--data-root", default=None, help="ImageNet VID root (default: the synthetic benchmark)")
    viz.set_defaults(func=_cmd_viz)

    data = commands.add_parser("data", help="datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    from datamodules.synthetic import SynthConfig
    from datamodules.synthetic_render import MARKER_STYLES

    SYNTH_DEFAULTS = SynthConfig()
    synth = data_commands.add_parser("synth", help="write the synthetic benchmark in the ILSVRC2015 VID layout")
    synth.add_argument("out", help="output folder")
    synth.add_argument("--videos", type=int, help="number of training videos")
    synth.add_argument("--val-videos", type=int, help="number of val videos")
    synth.add_argument("--frames", type=int, help="frames per video")
    synth.add_argument("--size", type=int, help="image side in pixels")
    synth.add_argument("--seed", type=int, help="random seed (the dataset is deterministic from it)")
    synth.add_argument("--cue-prob", type=float,
                       help=f"per object and frame: chance the class marker is drawn ({SYNTH_DEFAULTS.cue_prob})")
    synth.add_argument("--marker-width", type=float, help="marker band half-width, fraction of the object's "
                                                          f"half-size; 1 = the whole object ({SYNTH_DEFAULTS.marker_width})")
    synth.add_argument("--marker-blend", type=float, help="how far the marker moves towards white / black or its "
                                                          f"cue colour, 0..1 ({SYNTH_DEFAULTS.marker_blend})")
    synth.add_argument("--marker-style", choices=list(MARKER_STYLES),
                       help="the marker: colour (towards cyan/magenta), band (a light/dark band through the "
                            f"centre), tint (the whole object lighter/darker) ({SYNTH_DEFAULTS.marker_style})")
    synth.set_defaults(func=_cmd_data_synth)
    return parser


def _interrupt_on_sigterm() -> None:
    """SIGTERM (`kill`, a job scheduler's stop) ends a command as Ctrl-C does, not at once: a trial records
    that it was interrupted (and is retried without counting as a try), a stage keeps its last checkpoint,
    and `tafm run` stops its helper workers instead of leaving them claiming trials."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        signal.signal(signal.SIGTERM, interrupt)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _interrupt_on_sigterm()
    # each line as it is printed, also into a pipe (`| tee run.log`); a stream without the option (a capture) stays
    with contextlib.suppress(AttributeError, ValueError, OSError):
        sys.stdout.reconfigure(line_buffering=True)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "verbose", False):
        from ablations.console import quiet_libraries

        quiet_libraries()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as error:  # UserError is a ValueError
        if os.environ.get("TAFM_DEBUG"):
            raise
        print(f"tafm: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # whatever read the output has gone: `tafm cost --json | head`, `tafm run quick | head`
        from ablations.console import stdout_closed

        if not stdout_closed():
            raise  # another pipe broke (a socket, a child process's pipe): not the reader leaving, so not said to be
        sys.stdout = open(os.devnull, "w")  # no second error at exit, when Python flushes it
        if args.func is not _cmd_run:
            return 0  # the output was the point, and the reader had enough of it
        with contextlib.suppress(OSError):  # stderr may be the same closed pipe (`2>&1 | head`)
            print("tafm: output closed: stopped (the trial that ran is retried, not counted as a try; the same command "
                  "resumes)", file=sys.stderr)
        return 141  # as a shell reports a command ended by SIGPIPE: the run did not finish
    except KeyboardInterrupt:
        print("tafm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
