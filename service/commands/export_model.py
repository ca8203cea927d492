"""`flowie export-model`: a `flowie train --arch full` checkpoint -> a model directory and/or an official .ckpt."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="state.pt written by `flowie train --arch full` (OUT/checkpoints/state.pt)")
    parser.add_argument("-o", "--output", default=None, help="model directory to write (LoRA merged; `flowie serve` runs it)")
    parser.add_argument("--init", default=None, help="the init directory it was trained on (default: the one it records)")
    parser.add_argument("--official-ckpt", default=None,
                        help="also write the weights in the official Reflow_ControlLDM layout to this .ckpt")
    parser.add_argument("--text-encoder-from", default=None,
                        help="SD 2.1 ldm .ckpt whose cond_stage_model.* (OpenCLIP) goes into --official-ckpt, so the "
                             "official code loads it with strict=True")


def run(args: argparse.Namespace) -> int:
    import sys

    from flowie.convert import ConversionError
    from flowie.train.export import export_checkpoint

    if not args.output and not args.official_ckpt:
        print("flowie export-model: give -o MODEL_DIR and/or --official-ckpt FILE", file=sys.stderr)
        return 2
    try:
        written = export_checkpoint(args.checkpoint, args.output, args.init, args.official_ckpt, args.text_encoder_from)
    except (ConversionError, ValueError, KeyError) as exc:
        print(f"flowie export-model: error: {exc}", file=sys.stderr)
        return 1
    for what, where in written.items():
        print(f"[export-model] {what}: {where}", file=sys.stderr)
    return 0
