"""`flowie export --model DIR`: every stage -> DIR/onnx/<stage>.onnx, verified against torch."""

from __future__ import annotations

import argparse

STAGE_CHOICES = ("swinir", "cond_encoder", "flow_unet", "vae_decoder")


def _sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        height, _, width = item.strip().partition("x")
        sizes.append((int(height), int(width or height)))
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (from `flowie convert`)")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="weights and activations (default fp32)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--stages", nargs="+", choices=STAGE_CHOICES, default=None, help="default: all four")
    parser.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                        help="torch.onnx exporter (default torchscript; dynamo needs onnxscript)")
    parser.add_argument("--device", default="cpu", help="where to trace the modules (cpu, cuda); verification runs on the CPU")
    parser.add_argument("--force", action="store_true", help="re-export even if the files are up to date")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the onnxruntime-vs-torch check (not recommended)")
    parser.add_argument("--verify-sizes", type=_sizes, default=None, metavar="HxW,HxW",
                        help="image sizes to verify at (default: the model's size, square, and 64 px wider)")
    parser.add_argument("--verify-batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 2],
                        metavar="B,B", help="batch sizes to verify at (default 1,2)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max relative error (default 1e-4 for fp32, 1e-2 for fp16)")


def run(args: argparse.Namespace) -> int:
    import sys

    from export.onnx import ExportError, VerificationError, export_model
    from flowie.modeldir import ModelDirError

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        results = export_model(args.model, stages=args.stages, dtype=args.dtype, opset=args.opset,
                               exporter=args.exporter, verify=args.verify, force=args.force,
                               sizes=args.verify_sizes, batches=args.verify_batches, tolerance=args.tolerance,
                               device=args.device, progress=say)
    except VerificationError as exc:
        print(f"flowie export: VERIFICATION FAILED: {exc}", file=sys.stderr)
        return 1
    except (ExportError, ModelDirError) as exc:
        print(f"flowie export: {exc}", file=sys.stderr)
        return 2
    print("stage          action    max rel. error  file")
    for r in results:
        err = "-" if r.max_rel_err is None else f"{r.max_rel_err:.2e}"
        print(f"{r.stage:<14} {r.action:<9} {err:<15} {r.path}")
    return 0
