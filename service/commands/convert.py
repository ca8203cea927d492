"""`flowie convert`: official FlowIE or DiffBIR v1 checkpoint + config -> model directory (safetensors)."""

from __future__ import annotations

import argparse
import re


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="official Lightning .ckpt (read with weights_only=True) or .safetensors")
    parser.add_argument("--config", required=True,
                        help="official model config YAML (configs/model/cldm.yaml format, FlowIE or DiffBIR v1) or a "
                             "preset: bfr_v1, bsr_v1, diffbir_face_v1, diffbir_general_v1")
    parser.add_argument("--null-context", required=True,
                        help="null-prompt embedding [1,77,C]: the official weights/null_token_1024.pth, or .safetensors/.npy")
    parser.add_argument("-o", "--output", required=True, help="model directory to write")
    parser.add_argument("--task", type=_task_name, default=None,
                        help="task name the service routes by (default: from the config's target: cldm_bsr -> bsr, "
                             "ControlLDM (DiffBIR v1) -> diffbir, else bfr); bsr selects the official BSR recipe")
    parser.add_argument("--swinir", default=None,
                        help="separate SwinIR weights replacing the checkpoint's stage 1 (DiffBIR's "
                             "general_swinir_v1.ckpt with general_full_v1.ckpt)")
    parser.add_argument("--vae", default=None,
                        help="separate VAE weights (ldm or diffusers names) when the checkpoint lacks first_stage_model.*")
    parser.add_argument("--name", default=None, help="model name recorded in model.json")


def _task_name(value: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", value):
        raise argparse.ArgumentTypeError(f"task names are lower-case letters, digits and _, got {value!r}")
    return value


def run(args: argparse.Namespace) -> int:
    import sys

    from flowie.convert import ConversionError, convert

    def say(msg: str) -> None:
        print(f"[convert] {msg}", file=sys.stderr, flush=True)

    try:
        convert(args.checkpoint, args.config, args.output, args.null_context, task=args.task, vae=args.vae,
                name=args.name, progress=say, swinir=args.swinir)
    except ConversionError as exc:
        print(f"flowie convert: error: {exc}", file=sys.stderr)
        return 1
    return 0
