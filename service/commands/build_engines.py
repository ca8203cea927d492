"""`flowie build-engines --model DIR`: DIR/onnx/*.onnx -> TensorRT plans for this GPU."""

from __future__ import annotations

import argparse

STAGE_CHOICES = ("swinir", "cond_encoder", "flow_unet", "vae_decoder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory with onnx/ (from `flowie export`)")
    parser.add_argument("--fp16", action="store_true", help="allow fp16 kernels (I/O stays as exported)")
    parser.add_argument("--profile", default=None, metavar="MIN/OPT/MAX",
                        help="BATCHxPIXELS each, e.g. 1x64/1x512/8x1024 (default: each stage's envelope)")
    parser.add_argument("--stages", nargs="+", choices=STAGE_CHOICES, default=None, help="default: all four")
    parser.add_argument("--workspace-gb", type=float, default=8.0, help="builder workspace limit (default 8)")
    parser.add_argument("--optimization-level", type=int, default=3, choices=range(6),
                        help="TensorRT builder optimisation level 0-5 (default 3)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the plans are up to date")


def run(args: argparse.Namespace) -> int:
    import sys

    from engines.errors import EngineError
    from export.tensorrt import BuildError, BuildOptions, build_engines, parse_profile
    from flowie.modeldir import ModelDirError

    try:
        envelope = parse_profile(args.profile) if args.profile else None
    except ValueError as exc:
        print(f"flowie build-engines: {exc}", file=sys.stderr)
        return 2
    options = BuildOptions(fp16=args.fp16, workspace_gb=args.workspace_gb,
                           optimization_level=args.optimization_level, envelope=envelope)
    try:
        plan_dir = build_engines(args.model, stages=args.stages, options=options, force=args.force,
                                 progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (EngineError, BuildError, ModelDirError) as exc:
        # EngineError covers "TensorRT is not installed", "no CUDA GPU" and stale ONNX files.
        print(f"flowie build-engines: {exc}", file=sys.stderr)
        return 1
    print(plan_dir)
    return 0
