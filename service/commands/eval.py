"""`flowie eval --model DIR --images FOLDER|skimage-holdout`: PSNR/SSIM table, JSON and a side-by-side grid."""

from __future__ import annotations

import argparse

from service.commands._options import add_engine_overrides_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory (default: the bundled demo model)")
    parser.add_argument("--images", default="skimage-holdout",
                        help="folder of clean reference images, or 'skimage-holdout' (coffee, rocket: never trained on)")
    parser.add_argument("--degradation", default="x4_bar",
                        help="degradation preset applied to the clean images (default x4_bar: x4 bicubic down, "
                             "blur sigma 1.5, noise 5/255, JPEG q60); see flowie.train.degrade.PRESETS")
    parser.add_argument("--paired", default=None,
                        help="folder of your own degraded images named like the clean ones (instead of --degradation)")
    parser.add_argument("--out", default="eval_out", help="directory for results.json, results.md, grid.png")
    parser.add_argument("--figure", default=None, help="also save the grid here (e.g. docs/figures/demo_before_after.png)")
    parser.add_argument("--grid-crop", type=int, default=0,
                        help="show a centre window of N px at native resolution in the grid (0: whole images)")
    parser.add_argument("--euler-steps", type=int, default=4, help="Euler steps (default 4 = mean-value's evaluations)")
    parser.add_argument("--seed", type=int, default=0, help="degradation and noise seed (default 0)")
    parser.add_argument("--min-side", type=int, default=None, help="override the model's min_side")
    parser.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default=None,
                        help="override the model's colour fix")
    parser.add_argument("--crop-border", type=int, default=None, help="border crop in px (default: the scale factor)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N images")
    parser.add_argument("--record-in-card", action="store_true",
                        help="write the mean table and the bar into the model's model.json card")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    add_engine_overrides_argument(parser)
    for name in ("lpips", "fid", "maniqa"):
        parser.add_argument(f"--{name}-weights", default=None,
                            help=f"{name.upper()} weight file (never downloaded; needs pyiqa installed)")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    import torch

    from flowie import evaluate as ev
    from flowie.modeldir import DEMO_MODEL_DIR, ModelDirError
    from flowie.train.data import load_images

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else DEMO_MODEL_DIR
    extra = {n: getattr(args, f"{n}_weights") for n in ev.EXTRA_METRICS if getattr(args, f"{n}_weights")}
    try:
        from engines import EngineConfig, build_pipeline

        pipe = build_pipeline(model_dir, EngineConfig.for_device(args.device, overrides=args.engine_overrides))
        images = load_images(args.images)
        if args.limit:
            images = images[: args.limit]
        items, degradation = ev.make_items(images, preset=args.degradation, paired=args.paired, seed=args.seed)
        overrides = {k: v for k, v in {"min_side": args.min_side, "color_fix": args.color_fix}.items() if v is not None}

        def say(msg: str) -> None:
            print(f"[eval] {msg}", file=sys.stderr, flush=True)

        report, outputs = ev.evaluate(pipe, items, degradation, ev.default_methods(args.euler_steps), seed=args.seed,
                                      overrides=overrides, crop_border=args.crop_border, extra=extra, progress=say)
    except (ModelDirError, ValueError, RuntimeError) as exc:
        print(f"flowie eval: {exc}", file=sys.stderr)
        return 2
    paths = ev.write_outputs(report, outputs, args.out, grid_crop=args.grid_crop, figure=args.figure)
    if args.record_in_card:
        ev.record_in_card(model_dir, report)
    print(report.markdown())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0
