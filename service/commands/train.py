"""`flowie train --images FOLDER|skimage --out MODEL_DIR`: train the whole FlowIE stack on the CPU (or a GPU)."""

from __future__ import annotations

import argparse

from service.commands import train_full

PHASE_HELP = "swinir, vae, cond_encoder, flow"


def _per_phase(text: str | None, cast, what: str) -> dict:
    """'N' (every phase) or 'phase=N,phase=N' -> {phase: value}; phases not named keep their default."""
    from flowie.train.trainer import PHASES

    if text is None:
        return {}
    text = text.strip()
    if "=" not in text:
        return {phase: cast(text) for phase in PHASES}
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = {"cond": "cond_encoder"}.get(name.strip(), name.strip())
        if name not in PHASES:
            raise ValueError(f"--{what}: unknown phase {name!r}; phases are {PHASE_HELP}")
        out[name] = cast(value)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", default="skimage",
                        help="clean training images: a folder, 'skimage' (scikit-image's colour images, coffee and "
                             "rocket held out), 'skimage-photos' (its photographs astronaut, chelsea), "
                             "'plasma-photos[=ROOT]' (the photographs of Debian's plasma-workspace-wallpapers, "
                             "installed under ROOT, default /), or several joined with '+'; default skimage")
    parser.add_argument("--out", required=True, help="model directory to write (safetensors + model.json)")
    parser.add_argument("--steps", default=None,
                        help=f"steps per phase: N for every phase or e.g. 'swinir=2400,vae=1100,cond_encoder=200,flow=1500' (the default) "
                             f"(phases: {PHASE_HELP}; 0 skips a phase's training)")
    parser.add_argument("--batch", default=None, help="batch size: N or per phase, like --steps")
    parser.add_argument("--crop", default=None, help="crop size in pixels (multiple of 64): N or per phase")
    parser.add_argument("--lr", default=None, help="peak learning rate: X or per phase")
    parser.add_argument("--minutes", default=None,
                        help="time budget per phase: M or per phase like --steps (e.g. 'swinir=3,vae=2.5'); a phase "
                             "stops after fewer steps when its minutes run out, the schedule fitted to the steps that fit "
                             "(for a fixed-length GPU run; default: no limit)")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast for the forward passes (GPU runs; weights and optimiser stay float32)")
    parser.add_argument("--arch", default="demo", choices=["demo", "tiny", "full"],
                        help="network sizes (tiny: for tests; full: the official recipe on a `flowie init` directory)")
    parser.add_argument("--seed", type=int, default=0, help="seeds weights, crops, degradations and noise (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    parser.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUT/checkpoints)")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (default 200)")
    parser.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight of the VAE phase (default 1e-6)")
    parser.add_argument("--ssim-weight", type=float, default=0.0, help="weight of (1 - SSIM) in the SwinIR loss")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="train LoRA factors of this rank + the ControlNet on a frozen base UNet (needs --init-unet)")
    parser.add_argument("--init-from", default=None,
                        help="model directory with the same networks whose weights start every stage (fine-tuning)")
    parser.add_argument("--init-unet", default=None, help="flow_unet.safetensors whose UNet starts the flow phase")
    parser.add_argument("--flow-bank", type=int, default=1536,
                        help="precompute SwinIR/VAE latents for this many crops and train the flow on them "
                             "(faster; default 1536; 0: compute them for every step)")
    parser.add_argument("--min-side", type=int, default=1024,
                        help="min_side default written into model.json: the service upscales inputs so the short "
                             "side is >= this before the networks (default 1024; 0 disables)")
    parser.add_argument("--work-scale", default="1,3",
                        help="range LO,HI of that extra upscale to train for: crops are degraded at native scale and "
                             "shown LO..HI times larger (default 1,3; '1,1' = native only)")
    parser.add_argument("--rescale", default="0.5,1",
                        help="range LO,HI of the content scale of the crops: a crop shows a source region 1/r times "
                             "larger, shrunk (default 0.5,1; a lower LO gives large photos' crops more detail)")
    parser.add_argument("--degrade", default=None,
                        help="training degradation ranges to change, e.g. 'scale=2:4,noise_sigma=1:10,jpeg_quality=40:95' "
                             "(fields of flowie.train.degrade.DegradationRanges; default: the blind Real-ESRGAN-like "
                             "ranges, x1 to x4)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--workers", type=int, default=1, choices=[1, 2],
                        help="2: train SwinIR and the VAE at the same time in two processes (threads split between them)")
    parser.add_argument("--data-workers", type=int, default=0,
                        help="processes that prepare degraded crops ahead of training (useful with a GPU; default 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--name", default="flowie-demo", help="model name recorded in model.json")
    parser.add_argument("--weights-dtype", default="float32", choices=["float32", "float16"],
                        help="dtype of the written safetensors (float16 halves the directory; the demo uses it). "
                             "Training always runs in float32; the loader casts to the serving dtype")
    train_full.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.arch == "full":
        return train_full.run(args)
    import sys
    import time

    from tqdm import tqdm

    from flowie.train.degrade import parse_ranges
    from flowie.train.trainer import ARCHS, PHASES, TrainConfig, Trainer, _default_phases

    try:
        phases = _default_phases()
        for what, cast in (("steps", int), ("batch", int), ("crop", int), ("lr", float), ("minutes", float)):
            for phase, value in _per_phase(getattr(args, what), cast, what).items():
                setattr(phases[phase], what, value)
        bad = [f"{p}={c.crop}" for p, c in phases.items() if c.crop % 64 or c.crop <= 0]
        if bad:
            raise ValueError(f"--crop must be a positive multiple of 64 (SwinIR windows), got {', '.join(bad)}")
        swinir, vae, unet = ARCHS[args.arch]
        lo, _, hi = args.work_scale.partition(",")
        work_scale = (float(lo), float(hi or lo))
        lo, _, hi = args.rescale.partition(",")
        rescale = (float(lo), float(hi or lo))
        if not 0.0 < rescale[0] <= rescale[1] <= 1.0:
            raise ValueError(f"--rescale must be LO,HI with 0 < LO <= HI <= 1, got {args.rescale}")
        cfg = TrainConfig(out=args.out, images=args.images, checkpoint_dir=args.checkpoint_dir, seed=args.seed,
                          phases=phases, swinir=swinir, vae=vae, unet=unet, kl_weight=args.kl_weight,
                          ssim_weight=args.ssim_weight, lora_rank=args.lora_rank, init_unet=args.init_unet,
                          init_from=args.init_from,
                          flow_bank=args.flow_bank, checkpoint_every=args.checkpoint_every, threads=args.threads,
                          workers=args.workers, work_scale=work_scale, data_workers=args.data_workers,
                          device=args.device, name=args.name, defaults={"min_side": args.min_side},
                          weights_dtype=args.weights_dtype, bf16=args.bf16, ranges=parse_ranges(args.degrade), rescale=rescale)
    except ValueError as exc:
        print(f"flowie train: {exc}", file=sys.stderr)
        return 2

    bars: dict[str, tqdm] = {}

    def progress(phase: str, step: int, total: int, losses: dict) -> None:
        bar = bars.get(phase)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[phase] = tqdm(total=total, initial=step - 1, desc=phase, unit="step", file=sys.stderr,
                                     mininterval=2.0, dynamic_ncols=True)
        if bar.total != total:  # a phase's --minutes cut its step count
            bar.total = total
        bar.update(step - bar.n)
        if losses:
            bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items() if k != "loss" or len(losses) == 1}, refresh=False)

    start = time.perf_counter()
    try:
        trainer = Trainer(cfg, progress=progress)
        trainer.run(resume=args.resume)
    except (ValueError, RuntimeError) as exc:
        for bar in bars.values():
            bar.close()
        print(f"flowie train: {exc}", file=sys.stderr)
        return 1
    for bar in bars.values():
        bar.close()
    out = trainer.write_model()
    done = {p: trainer.history.get(p, {}).get("steps", 0) for p in PHASES}
    print(f"[train] wrote {out} in {time.perf_counter() - start:.0f} s; steps {done}; "
          f"scale_factor {trainer.scale_factor:.4f}. Check it with: flowie eval --model {out}", file=sys.stderr)
    return 0
