"""`flowie convert`: official checkpoint + config -> model directory (safetensors, LoRA merged)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="official Lightning .ckpt (read with weights_only=True) or .safetensors")
    parser.add_argument("--config", required=True,
                        help="official model config YAML (configs/model/cldm.yaml format) or a preset: bfr_v1, bsr_v1")
    parser.add_argument("--null-context", required=True,
                        help="null-prompt embedding [1,77,C]: the official weights/null_token_1024.pth, or .safetensors/.npy")
    parser.add_argument("-o", "--output", required=True, help="model directory to write")
    parser.add_argument("--task", choices=["bfr", "bsr"], default=None,
                        help="task name (default: from the config's target: cldm_bsr -> bsr, else bfr)")
    parser.add_argument("--vae", default=None,
                        help="separate VAE weights (ldm or diffusers names) when the checkpoint lacks first_stage_model.*")
    parser.add_argument("--name", default=None, help="model name recorded in model.json")


def run(args: argparse.Namespace) -> int:
    import sys

    from flowie.convert import ConversionError, convert

    def say(msg: str) -> None:
        print(f"[convert] {msg}", file=sys.stderr, flush=True)

    try:
        convert(args.checkpoint, args.config, args.output, args.null_context, task=args.task, vae=args.vae,
                name=args.name, progress=say)
    except ConversionError as exc:
        print(f"flowie convert: error: {exc}", file=sys.stderr)
        return 1
    return 0
