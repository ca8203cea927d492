"""`flowie init`: Stable Diffusion 2.1-base + DiffBIR/SwinIR parts -> a full-size starting point for `flowie train --arch full`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="official model config YAML (configs/model/cldm.yaml format) or a preset: bfr_v1, bsr_v1")
    parser.add_argument("--sd", required=True,
                        help="SD 2.1-base: the ldm .ckpt (v2-1_512-ema-pruned.ckpt) or a diffusers folder with unet/ and vae/")
    parser.add_argument("--controlnet-from", default=None,
                        help="DiffBIR v1 full checkpoint whose control_model.* starts the ControlNet "
                             "(default: copied from the UNet as the official stage-2 script does)")
    parser.add_argument("--swinir", default=None,
                        help="SwinIR weights: general_swinir_v1.ckpt / face_swinir_v1.ckpt, a DiffBIR full checkpoint, "
                             "a `flowie train` swinir.pt or a model directory")
    parser.add_argument("--null-context", required=True,
                        help="null-prompt embedding [1,77,C]: the official weights/null_token_1024.pth, or .safetensors/.npy")
    parser.add_argument("-o", "--output", required=True, help="init directory to write")


def run(args: argparse.Namespace) -> int:
    import sys

    from flowie.convert import ConversionError
    from flowie.train.init import init_model

    def say(msg: str) -> None:
        print(f"[init] {msg}", file=sys.stderr, flush=True)

    try:
        init_model(args.config, args.sd, args.null_context, args.output, controlnet_from=args.controlnet_from,
                   swinir=args.swinir, progress=say)
    except ConversionError as exc:
        print(f"flowie init: error: {exc}", file=sys.stderr)
        return 1
    return 0
