"""`flowie train --arch full`: the official FlowIE recipe on a `flowie init` directory (torchrun for many GPUs).

The options shared with the small-model trainer (--images, --out, --steps, --batch, --crop, --lr,
--seed, --resume, --checkpoint-dir, --checkpoint-every, --lora-rank, --threads, --device, --name,
--bf16) are defined by service/commands/train.py; this module adds the full recipe's own and runs it.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--arch full (the official recipe, under torchrun for data-parallel runs)")
    group.add_argument("--init", default=None, help="init directory written by `flowie init` (required with --arch full)")
    group.add_argument("--degradation", default="face", choices=["face", "general"],
                       help="face: CodeFormer-style on aligned faces; general: Real-ESRGAN second order (default face)")
    group.add_argument("--accum", type=int, default=1, help="micro-batches per optimiser step (default 1)")
    group.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute block activations in the backward pass (less activation memory, more compute)")
    group.add_argument("--export-every", type=int, default=0,
                       help="also write a model directory OUT/step-NNNNNNN every this many steps (default 0: only at the end)")
    group.add_argument("--log-every", type=int, default=10, help="steps between loss log lines (default 10)")
    group.add_argument("--val-images", default=None,
                       help="held-out images (folder or file list): validation loss, and previews in TensorBoard")
    group.add_argument("--val-every", type=int, default=1000, help="steps between validations (default 1000)")


def _one(text: str | None, cast, default, what: str):
    """--steps/--batch/--crop/--lr take one value with --arch full (no phases)."""
    if text is None:
        return default
    if "=" in str(text) or "," in str(text):
        raise ValueError(f"--{what} takes one value with --arch full, got {text!r}")
    return cast(text)


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    import torch
    from tqdm import tqdm

    from flowie.train import distributed
    from flowie.train.full import FullConfig, FullTrainer

    try:
        if not args.init:
            raise ValueError("--arch full needs --init INIT_DIR (made by `flowie init`)")
        if args.minutes:
            raise ValueError("--minutes is for the demo and tiny architectures; with --arch full set --steps")
        cfg = FullConfig(init=args.init, images=args.images, out=args.out, steps=_one(args.steps, int, 1000, "steps"),
                         batch=_one(args.batch, int, 1, "batch"), accum=args.accum, crop=_one(args.crop, int, 512, "crop"),
                         lr=_one(args.lr, float, 1e-4, "lr"), lora_rank=args.lora_rank, degradation=args.degradation,
                         seed=args.seed, bf16=args.bf16, grad_checkpointing=args.grad_checkpointing,
                         checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                         export_every=args.export_every, log_every=args.log_every, val_images=args.val_images,
                         val_every=args.val_every, data_workers=args.data_workers, device=args.device)
        if cfg.crop % 64 or cfg.crop <= 0:
            raise ValueError(f"--crop must be a positive multiple of 64, got {cfg.crop}")
        if min(cfg.batch, cfg.accum, cfg.steps) <= 0:
            raise ValueError("--batch, --accum and --steps must be positive")
    except ValueError as exc:
        print(f"flowie train: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    world = distributed.world_from_env(dict(os.environ))
    device = distributed.device_for(cfg.device, world)
    distributed.start(world, device)
    bar = None
    try:
        if world.is_main:
            bar = tqdm(total=cfg.steps, desc="train", unit="step", file=sys.stderr, mininterval=2.0, dynamic_ncols=True)

        def progress(step: int, total: int, loss: float, rate: float) -> None:
            if bar is not None:
                bar.update(step - bar.n)
                bar.set_postfix({"loss": f"{loss:.4g}", "img/s": f"{rate:.3g}"}, refresh=False)

        trainer = FullTrainer(cfg, world, progress=progress)
        if bar is not None and args.resume:
            bar.reset()
        trainer.run(resume=args.resume)
    except (ValueError, RuntimeError) as exc:
        print(f"flowie train: {exc}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
        distributed.stop()
    if world.is_main:
        print(f"[train] {trainer.step} steps, global batch {trainer.global_batch} on {world.size} process(es); "
              f"model directory {cfg.out}. Serve it with: flowie serve --model {cfg.out}", file=sys.stderr)
    return 0
