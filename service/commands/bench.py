"""`flowie bench`: per-stage and end-to-end timings of back ends, measured in one run.

    flowie bench --model DIR --backend torch,onnx --batch 1,4 --size 512 --repeats 5 --json bench.json
    flowie bench --preset bfr_v1 --stages vae_decoder --backend torch,onnx --batch 1 --size 512

The second form times full-size networks with random weights (no checkpoint needed);
the onnx back end then exports them to --workdir first. Each number is the median of
--repeats calls after --warmup untimed ones; ratios compare back ends measured in the same
run, on the same inputs, against the first back end listed.
"""

from __future__ import annotations

import argparse

from flowie.stages import STAGE_NAMES as STAGE_CHOICES
from service.commands._options import add_engine_overrides_argument


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        height, _, width = item.strip().partition("x")
        sizes.append((int(height), int(width or height)))
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory (the onnx back end needs `flowie export` first)")
    source.add_argument("--preset", help="time full-size networks of a preset config (bfr_v1, bsr_v1) "
                                         "with random weights; per-stage only")
    parser.add_argument("--backend", default="torch,onnx", help="comma-separated: torch, onnx, tensorrt (default torch,onnx)")
    parser.add_argument("--batch", type=_ints, default=[1], help="comma-separated batch sizes (default 1)")
    parser.add_argument("--size", type=_sizes, default=[(512, 512)], help="image sizes, PX or HxW, comma-separated (default 512)")
    parser.add_argument("--stages", nargs="+", choices=STAGE_CHOICES, default=None, help="default: all four")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement; the median is reported (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument("--no-end-to-end", dest="end_to_end", action="store_false", help="per-stage timings only")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="auto: float16 for the torch back end on CUDA, float32 otherwise (as the service)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch and onnxruntime alike (0: each library's default)")
    parser.add_argument("--torch-compile", action="store_true", help="torch back end: compile every stage")
    add_engine_overrides_argument(parser)
    parser.add_argument("--workdir", default=None, help="--preset: where to export ONNX files (default: a temp dir)")
    parser.add_argument("--json", default=None, metavar="OUT", help="write every measurement to this JSON file")


def run(args: argparse.Namespace) -> int:
    import json
    import shlex
    import sys
    import tempfile
    from datetime import datetime, timezone
    from pathlib import Path

    import torch

    from engines import EngineError, normalise_backend
    from engines.bench import bench_end_to_end, bench_stage, machine_info
    from flowie.modeldir import ModelDirError

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        backends = [normalise_backend(b) for b in args.backend.split(",") if b.strip()]
    except ValueError as exc:
        print(f"flowie bench: {exc}", file=sys.stderr)
        return 2
    for height, width in args.size:
        if height % 64 or width % 64:
            print(f"flowie bench: sizes must be multiples of 64 pixels, got {height}x{width}", file=sys.stderr)
            return 2
    if args.repeats < 1 or args.warmup < 0:
        print("flowie bench: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stages = list(args.stages or STAGE_CHOICES)
    rows: list[dict] = []
    outputs: dict[tuple, torch.Tensor] = {}
    workdir_cm = tempfile.TemporaryDirectory(prefix="flowie-bench-") if args.preset and not args.workdir else None
    try:
        if args.preset:
            context, make_engines = _preset_source(args, stages, device,
                                                   Path(args.workdir or workdir_cm.name), say)  # type: ignore[union-attr]
        else:
            context, make_engines = _model_source(args, stages, say)
        for backend in backends:
            say(f"[{backend}] loading {len(stages)} stage(s) on {device}")
            engines = make_engines(backend)
            pipe = _pipeline(args, engines, backend) if args.model and args.end_to_end else None
            for batch in args.batch:
                for height, width in args.size:
                    for stage in stages:
                        engine = engines[stage]
                        stats = bench_stage(engine, batch, height, width, context, args.warmup, args.repeats)
                        key = (batch, height, width, stage)
                        row = _row(backend, key, stats, engine.describe())
                        _compare(row, key, engine, batch, height, width, context, outputs, backends[0] == backend)
                        rows.append(row)
                        say(f"[{backend}] batch {batch}, {height}x{width}: {stage} {stats['median_ms']:.1f} ms")
                    if pipe is not None:
                        from flowie.params import EnhanceParams

                        params = EnhanceParams(tile="off", upscale=1.0, min_side=0)
                        stats = bench_end_to_end(pipe, batch, height, width, params, args.warmup, args.repeats)
                        rows.append(_row(backend, (batch, height, width, "end_to_end"), stats,
                                         {"sampler": pipe.resolve(params).sampler, "steps": pipe.resolve(params).steps}))
                        say(f"[{backend}] batch {batch}, {height}x{width}: end to end {stats['median_ms']:.1f} ms")
            del engines, pipe
    except (EngineError, ModelDirError, ValueError) as exc:
        print(f"flowie bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if workdir_cm is not None:
            workdir_cm.cleanup()
    _add_ratios(rows, backends[0])
    _print_table(rows, backends[0])
    if args.json:
        report = {
            "command": "flowie " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(device),
            "model": args.model or f"preset:{args.preset} (random weights)",
            "settings": {"backends": backends, "batches": args.batch, "sizes": args.size, "stages": stages,
                         "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads or "default",
                         "engines": {b: _config(args, b).describe() for b in backends}},
            "results": rows,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        say(f"wrote {args.json}")
    return 0


def _config(args, backend: str):
    """The engine configuration the service would use for this device and back end, plus the flags."""
    import dataclasses

    from engines import EngineConfig

    config = EngineConfig.for_device(args.device, backend=backend, dtype=args.dtype, torch_compile=args.torch_compile,
                                     overrides=args.engine_overrides)
    return dataclasses.replace(config, intra_op_threads=args.threads) if backend == "onnx" else config


def _model_source(args, stages, say):
    from engines import build_engines
    from flowie.model import load_null_context
    from flowie.modeldir import read_model_dir

    info = read_model_dir(args.model)
    context = load_null_context(info)

    def make(backend):
        return build_engines(args.model, _config(args, backend), stages=tuple(stages))

    return context, make


def _preset_source(args, stages, device, workdir, say):
    """Full-size networks of a preset with seeded random weights; ONNX exported on first use."""
    import torch

    from engines import torch_engine
    from engines.base import random_inputs
    from engines.ort_engine import OrtEngine
    from export.onnx import export_module
    from flowie.convert import _stage_configs, load_config, parse_config
    from flowie.model import build_stage
    from flowie.stages import STAGES

    spec = parse_config(load_config(args.preset))
    configs = _stage_configs(spec)
    context = torch.randn(1, 77, spec.unet.context_dim, generator=torch.Generator().manual_seed(0))
    modules = {}
    for stage in stages:
        torch.manual_seed(0)
        modules[stage] = build_stage(stage, configs[stage]).eval().requires_grad_(False)
        count = sum(p.numel() for p in modules[stage].parameters())
        say(f"built {stage} of {args.preset} with random weights ({count / 1e6:.1f} M parameters)")

    def make(backend):
        if backend == "torch":
            config = _config(args, backend)
            return {s: torch_engine(m, s, config) for s, m in modules.items()}
        if backend == "onnx":
            engines = {}
            for s, module in modules.items():
                path = workdir / f"{s}.onnx"
                if not path.exists():
                    say(f"exporting {s} to {path}")
                    example = random_inputs(STAGES[s], 2, 576, 512, context, torch.Generator().manual_seed(1))
                    export_module(module, STAGES[s], workdir, example)
                engines[s] = OrtEngine(path, STAGES[s], device, intra_op_threads=args.threads)
            return engines
        raise ValueError(f"--preset benchmarks torch and onnx, not {backend}")

    return context, make


def _pipeline(args, engines, backend):
    """The served pipeline around the engines just timed (end to end needs every stage)."""
    from engines import build_pipeline

    if set(STAGE_CHOICES) - set(engines):
        return None
    return build_pipeline(args.model, _config(args, backend), stages=engines)


def _row(backend: str, key: tuple, stats: dict, details: dict) -> dict:
    batch, height, width, stage = key
    return {"backend": backend, "batch": batch, "height": height, "width": width, "stage": stage, **stats,
            "details": details}


def _compare(row, key, engine, batch, height, width, context, outputs, is_reference) -> None:
    """Relative difference of this back end's output from the first back end's, same inputs."""
    import torch

    from engines.base import random_inputs

    inputs = random_inputs(engine.spec, batch, height, width, context, torch.Generator().manual_seed(0))
    out = engine(*[x.to(engine.device) for x in inputs]).double().cpu()
    if is_reference:
        outputs[key] = out
    elif key in outputs:
        ref = outputs[key]
        row["rel_diff_vs_first"] = float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _add_ratios(rows: list[dict], reference: str) -> None:
    base = {(r["batch"], r["height"], r["width"], r["stage"]): r["median_ms"] for r in rows if r["backend"] == reference}
    for r in rows:
        ref = base.get((r["batch"], r["height"], r["width"], r["stage"]))
        if ref:
            r[f"ratio_vs_{reference}"] = r["median_ms"] / ref


def _print_table(rows: list[dict], reference: str) -> None:
    print(f"{'backend':<9} {'batch':>5} {'size':>10} {'stage':<13} {'median ms':>10} {'min ms':>9} "
          f"{'x ' + reference:>9} {'rel diff':>9}")
    for r in rows:
        ratio = r.get(f"ratio_vs_{reference}")
        diff = r.get("rel_diff_vs_first")
        print(f"{r['backend']:<9} {r['batch']:>5} {str(r['height']) + 'x' + str(r['width']):>10} {r['stage']:<13} "
              f"{r['median_ms']:>10.1f} {r['min_ms']:>9.1f} {'' if ratio is None else f'{ratio:.2f}':>9} "
              f"{'' if diff is None else f'{diff:.1e}':>9}")
