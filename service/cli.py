"""The `flowie` command: the composition root that wires model, engines and queue.

Each sub-command lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so `flowie api` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). Order is the order shown by `flowie --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("service.commands.convert", "official FlowIE checkpoint + config -> model directory"),
    "export": ("service.commands.export", "model directory stages -> ONNX, verified against torch"),
    "build-engines": ("service.commands.build_engines", "ONNX -> TensorRT plans for this GPU"),
    "bench": ("service.commands.bench", "per-stage and end-to-end timings, back ends compared"),
    "enhance": ("service.commands.enhance", "restore image files from the command line"),
    "init": ("service.commands.init", "SD 2.1-base + DiffBIR/SwinIR parts -> a full-size start for `train --arch full`"),
    "train": ("service.commands.train", "train a small FlowIE model (all stages) on a folder of images, on the CPU"),
    "export-model": ("service.commands.export_model", "`train --arch full` checkpoint -> model directory / official .ckpt"),
    "eval": ("service.commands.eval", "PSNR/SSIM of a model on held-out images: input, SwinIR, samplers; table + figure"),
    "serve": ("service.commands.serve", "HTTP API + in-process worker + in-memory queue (no Redis needed)"),
    "api": ("service.commands.api", "HTTP API only, joined to `flowie worker` processes by Redis"),
    "worker": ("service.commands.worker", "GPU/CPU worker: takes jobs from Redis, batches, runs the model"),
}

# Commands that run networks in this process and take --engine-overrides (FLOWIE_ENGINE_OVERRIDES).
HOST_MEMORY_COMMANDS = ("enhance", "eval", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowie",
        description="FlowIE Serve: few-step rectified-flow image restoration (CVPR 2024).",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        # Argument definitions are light; the module imports heavy things only inside run().
        importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.command in HOST_MEMORY_COMMANDS:  # serve and worker apply host_malloc with their settings
        from engines.config import EngineConfig
        from service import hostmem

        try:  # before any thread starts: glibc fixes its arenas when a second thread first allocates
            config = EngineConfig.for_device(getattr(args, "device", "cpu"), overrides=args.engine_overrides)
            done = hostmem.apply(config.host_malloc)
        except ValueError as exc:
            sys.stderr.write(f"flowie {args.command}: {exc}\n")
            return 2
        logging.getLogger("flowie.service.host").debug("host memory: %s", done)
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
