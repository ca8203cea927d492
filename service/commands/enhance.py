"""`flowie enhance IN... -o OUTDIR`: restore image files through the same Pipeline the service runs."""

from __future__ import annotations

import argparse

from flowie.faces.weights import DETECTORS
from flowie.params import COLOR_FIXES, FACE_MODES, SAMPLERS, TILE_MODES
from service.commands._options import add_engine_overrides_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files (PNG, JPEG, WebP, BMP, TIFF) or .npy uint8 NHWC stacks")
    parser.add_argument("-o", "--output", required=True, help="directory for the results (one PNG per input)")
    parser.add_argument("--model", default=None, help="model directory (default: the bundled demo model)")
    parser.add_argument("--task", default=None, help="check that the model serves this task (bfr, bsr, ...)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the model's (model.json)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (network evaluations); default: model's")
    parser.add_argument("--upscale", type=float, default=None, help="output size factor (>= 1); default: model's")
    parser.add_argument("--color-fix", choices=COLOR_FIXES, default=None, help="default: the model's")
    parser.add_argument("--min-side", type=int, default=None,
                        help="bicubic-upscale so the short side is >= N before the networks (0 disables); default: model's")
    parser.add_argument("--tile", choices=TILE_MODES, default=None, help="tiled inference for large images")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default: random, printed)")
    parser.add_argument("--noise", default=None,
                        help="reproducibility: .npy [N,4,h,w] float32, row i is the initial latent x_T of input i "
                             "(h, w = the padded work size / 8)")
    parser.add_argument("--step-noise", default=None,
                        help="reproducibility (ddpm): .npy [steps,N,4,h,w] float32, the noise each step draws, "
                             "[:, i] for input i; with --noise it replays an official DiffBIR run exactly")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="auto: float16 for the torch back end on CUDA, float32 otherwise (as the service)")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx", "tensorrt"])
    parser.add_argument("--spill-dir", default="auto",
                        help="where a large image's SwinIR output waits: auto (a temp file on the CPU for "
                             "large outputs), off (RAM) or a directory")
    add_engine_overrides_argument(parser)
    parser.add_argument("--save-restored", action="store_true", help="also write the stage-1 (SwinIR) output")
    parser.add_argument("--faces", choices=FACE_MODES, default="aligned",
                        help="detect: find, align and restore every face of a whole photo (a bfr model); "
                             "aligned (default): each input goes through the model as it is")
    parser.add_argument("--background", choices=("swinir", "resize"), default="resize",
                        help="with --faces detect: the area around the faces, the face model's stage 1 or a resize")
    parser.add_argument("--save-faces", default=None, metavar="DIR",
                        help="with --faces detect: write each aligned crop and its restored face to DIR")
    parser.add_argument("--face-detector", choices=DETECTORS,
                        default="mtcnn", help="with --faces detect: mtcnn (offline, the facenet-pytorch wheel's "
                        "weights) or facexlib's RetinaFace (its file in --face-models)")
    parser.add_argument("--face-models", default="", metavar="DIR",
                        help="directory holding facexlib's detection_Resnet50_Final.pth, "
                             "detection_mobilenet0.25_Final.pth and/or parsing_parsenet.pth")
    parser.add_argument("--face-parser", choices=("auto", "none"), default="auto",
                        help="auto: ParseNet's mask for the paste-back when parsing_parsenet.pth is in "
                             "--face-models; none: the offline ellipse")


def _read_inputs(paths: list[str]):
    from pathlib import Path

    import numpy as np
    from PIL import Image, ImageOps

    items = []
    for raw in paths:
        path = Path(raw)
        if path.suffix == ".npy":
            stack = np.load(path, allow_pickle=False)
            if stack.dtype != np.uint8 or stack.ndim not in (3, 4):
                raise ValueError(f"{path}: expected a uint8 HWC image or NHWC stack")
            stack = stack[None] if stack.ndim == 3 else stack
            items += [(f"{path.stem}_{i}", img) for i, img in enumerate(stack)]
        else:
            with Image.open(path) as im:
                items.append((path.stem, np.asarray(ImageOps.exif_transpose(im).convert("RGB"))))
    return items


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image
    from tqdm import tqdm

    from flowie.modeldir import DEMO_MODEL_DIR, ModelDirError, read_model_dir
    from flowie.params import EnhanceParams, ParamError

    model_dir = Path(args.model) if args.model else DEMO_MODEL_DIR
    try:
        info = read_model_dir(model_dir)
    except ModelDirError as exc:
        print(f"flowie enhance: {exc}", file=sys.stderr)
        return 2
    if args.task and args.task != info.task:
        print(f"flowie enhance: model {model_dir} serves task {info.task!r}, not {args.task!r}", file=sys.stderr)
        return 2
    params = EnhanceParams(sampler=args.sampler, steps=args.steps, color_fix=args.color_fix, upscale=args.upscale,
                           min_side=args.min_side, tile=args.tile, seed=args.seed)
    try:
        params.validate()
        items = _read_inputs(args.inputs)
    except (ParamError, ValueError, OSError) as exc:
        print(f"flowie enhance: {exc}", file=sys.stderr)
        return 2
    noise = None
    if args.noise:
        noise = torch.from_numpy(np.load(args.noise, allow_pickle=False)).float()
        if noise.shape[0] != len(items):
            print(f"flowie enhance: --noise has {noise.shape[0]} rows for {len(items)} images", file=sys.stderr)
            return 2
    step_noise = None
    if args.step_noise:
        step_noise = torch.from_numpy(np.load(args.step_noise, allow_pickle=False)).float()
        if step_noise.dim() != 5 or step_noise.shape[1] != len(items):
            print(f"flowie enhance: --step-noise needs [steps, {len(items)}, 4, h, w], got {list(step_noise.shape)}",
                  file=sys.stderr)
            return 2
    from engines import EngineConfig, EngineError, build_pipeline

    try:
        config = EngineConfig.for_device(args.device, backend=args.backend, dtype=args.dtype,
                                         spill_dir=args.spill_dir, overrides=args.engine_overrides)
        pipe = build_pipeline(model_dir, config)  # the service's engines and defaults for this device
    except (EngineError, ValueError) as exc:
        print(f"flowie enhance: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.faces == "detect":
        return _enhance_photos(args, pipe, params, items, out_dir)
    for i, (stem, image) in enumerate(tqdm(items, desc="enhance", unit="img", file=sys.stderr)):
        row_noise = noise[i : i + 1] if noise is not None else None
        row_steps = step_noise[:, i : i + 1] if step_noise is not None else None
        try:
            result = pipe.enhance([image], params, noise=row_noise, keep_restored=args.save_restored,
                                  step_noise=row_steps)[0]
        except ValueError as exc:  # a sampler the model cannot run, noise of the wrong shape
            print(f"flowie enhance: {exc}", file=sys.stderr)
            return 2
        Image.fromarray(result.image).save(out_dir / f"{stem}.png")
        if args.save_restored:
            Image.fromarray(result.restored).save(out_dir / f"{stem}_restored.png")
        timing = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items())
        print(f"{stem}: seed {result.seed}; {timing}", file=sys.stderr)
    return 0


def _enhance_photos(args: argparse.Namespace, pipe, params, items, out_dir) -> int:
    """--faces detect: every input through flowie.faces.restore, one photo at a time."""
    import dataclasses
    import secrets
    import sys
    from pathlib import Path

    from PIL import Image

    from flowie.faces.restore import FaceRestorer
    from flowie.faces.weights import FaceWeightsError
    from service.faces_job import load_detector, load_parser

    if pipe.info.task != "bfr":
        print(f"flowie enhance: --faces detect needs a face model (task bfr), not {pipe.info.task!r}", file=sys.stderr)
        return 2
    try:
        restorer = FaceRestorer(pipe, load_detector(args.face_detector, args.device, args.face_models),
                                parser=load_parser(args.face_parser, args.face_models, args.device))
    except (FaceWeightsError, ValueError) as exc:
        print(f"flowie enhance: {exc}", file=sys.stderr)
        return 2
    params = dataclasses.replace(params, faces="detect", background=args.background)
    faces_dir = Path(args.save_faces) if args.save_faces else None
    if faces_dir is not None:
        faces_dir.mkdir(parents=True, exist_ok=True)
    for stem, image in items:
        seed = args.seed if args.seed is not None else secrets.randbits(63)
        result = restorer.enhance([image], params, [seed], keep_crops=faces_dir is not None)[0]
        Image.fromarray(result.image).save(out_dir / f"{stem}.png")
        if faces_dir is not None:
            for k, (aligned, restored) in enumerate(zip(result.aligned, result.restored_faces, strict=True)):
                Image.fromarray(aligned).save(faces_dir / f"{stem}_{k:02d}_aligned.png")
                Image.fromarray(restored).save(faces_dir / f"{stem}_{k:02d}_restored.png")
        print(f"{stem}: {len(result.faces)} faces; seed {seed}; "
              f"detect {result.timings['face_detect'] * 1000:.0f} ms, total {result.timings['total'] * 1000:.0f} ms",
              file=sys.stderr)
    return 0
