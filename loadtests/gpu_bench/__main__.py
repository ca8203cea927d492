"""FlowIE GPU benchmark: the served pipeline per engine configuration, in one run.

    python3 -m loadtests.gpu_bench --out $OUT --time-limit-s 400          # on a GPU
    python3 -m loadtests.gpu_bench --tiny --out /tmp/bench                # anywhere, the tiny model

Writes a model directory of seeded random weights (``--preset``, full size by default; speed does
not depend on the weights' values) to ``<out>/model`` unless ``--model`` names one, then runs the
sections (``--sections``): env, peak, configs, warmup. Results go to ``<out>/gpu_bench.json`` after
every section, so a run cut short keeps its data; no section starts after ``--time-limit-s``.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before the heavy imports: the time limit counts them too

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from .configs import CONFIGS, engine_config, run_config  # noqa: E402
from .model import TINY_CONFIG, random_model_dir  # noqa: E402
from .peak import ceilings, stage_flops  # noqa: E402
from .report import Report, environment, log  # noqa: E402
from .warmup import run_warmup  # noqa: E402

SECTIONS = ("env", "peak", "configs", "warmup")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown configuration {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    return names


def _sections(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or set(names) - set(SECTIONS):
        raise argparse.ArgumentTypeError(f"sections are {', '.join(SECTIONS)}")
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m loadtests.gpu_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU (development and tests)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "out"),
                   help="folder for gpu_bench.json (default $OUT or ./out)")
    p.add_argument("--model", type=Path, default=None, help="a model directory to time (default: random weights)")
    p.add_argument("--preset", default="bfr_v1", help="the random-weight model's config (default bfr_v1)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available; cpu with --tiny)")
    p.add_argument("--time-limit-s", type=float, default=400.0, help="no section starts after this (default 400)")
    p.add_argument("--sections", type=_sections, default=list(SECTIONS), help=f"default {','.join(SECTIONS)}")
    p.add_argument("--configs", type=_names, default=None,
                   help=f"engine configurations to time, the first is the anchor; of {', '.join(CONFIGS)} "
                        "(default fp32,served_eager,served; tiny fp32,served_eager,bf16,channels_last)")
    p.add_argument("--warmup-config", choices=list(CONFIGS), default=None,
                   help="the warmup section's configuration (default served; tiny served_eager)")
    p.add_argument("--batch-sizes", type=_ints, default=None, help="comma-separated (default 1,16; tiny 1,2)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512; tiny 128)")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=20)
    p.add_argument("--rep-target-s", type=float, default=3.0, help="repeat until this much time is timed")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    tiny = args.tiny
    args.configs = args.configs or (["fp32", "served_eager", "bf16", "channels_last"] if tiny
                                    else ["fp32", "served_eager", "served"])
    args.warmup_config = args.warmup_config or ("served_eager" if tiny else "served")
    args.batch_sizes = args.batch_sizes or ([1, 2] if tiny else [1, 16])
    args.size = args.size or (128 if tiny else 512)
    if tiny:
        args.min_reps, args.max_reps, args.rep_target_s = 1, 1, 0.0
    return args


def table(data: dict) -> str:
    lines = [f"FlowIE gpu_bench on {data.get('env', {}).get('gpu', data.get('env', {}).get('device', '?'))}, "
             f"{data.get('env', {}).get('date_utc', '')}",
             f"{'configuration':<20} {'workload':<8} {'batch':>5} {'ms/batch':>10} {'img/s':>8} {'PSNR vs fp32':>13}"]
    for name, rec in data.get("configs", {}).items():
        for workload, rows in rec.get("workloads", {}).items():
            for b, row in rows.items():
                if row.get("status") != "done":
                    lines.append(f"{name:<20} {workload:<8} {b:>5} {row.get('reason', '')}")
                    continue
                check = row.get("vs_fp32")
                psnr = "anchor" if check is None else "exact" if check["exact"] else f"{check['psnr_db']:.1f} dB"
                lines.append(f"{name:<20} {workload:<8} {b:>5} {row['batch_ms']:>10.1f} {row['img_per_s']:>8.2f} "
                             f"{psnr:>13}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    report = Report(args.out, args.time_limit_s, STARTED)
    data, cuda = report.data, args.device.type == "cuda"
    preset = TINY_CONFIG if args.tiny else args.preset
    if cuda:
        torch.cuda.set_device(args.device)
    if args.model is None:
        log(f"model directory of random weights at {args.out / 'model'} (written once)")
    model_dir = args.model or random_model_dir(args.out / "model", preset)
    data["model_dir"] = str(model_dir)
    log(f"device {args.device}, {args.size}px, batches {args.batch_sizes}, configurations {args.configs}")
    wanted = set(args.sections)

    def skip(name: str) -> str | None:
        return None if name in wanted else "not in --sections"

    report.section("env", lambda rec: rec.update(environment(args.device, argv)), skip("env"))
    report.section("peak", lambda rec: (ceilings(rec, args.device, args.tiny),
                                        stage_flops(rec.setdefault("flops", {}), preset, args.size)), skip("peak"))
    answers: dict = {}  # the anchor's answers, per (workload, batch)
    reps = (args.min_reps, args.max_reps, args.rep_target_s)
    for name in args.configs:
        try:
            config, reason = engine_config(name, args.device), skip("configs")
        except ValueError as exc:
            config, reason = None, str(exc)

        def timed(rec: dict, name: str = name, config=config) -> None:
            run_config(name, rec, config, model_dir, args.batch_sizes, args.size, reps, answers, report.remaining)

        report.section(f"configs.{name}", timed, reason, record=data.setdefault("configs", {}).setdefault(name, {}))
    try:
        warm_config, reason = engine_config(args.warmup_config, args.device), skip("warmup")
    except ValueError as exc:
        warm_config, reason = None, str(exc)
    report.section("warmup", lambda rec: run_warmup(rec, warm_config, model_dir, args.size, max(args.batch_sizes)),
                   reason)
    text = table(data)
    (args.out / "gpu_bench_table.txt").write_text(text + "\n")
    print(text, flush=True)
    errors = [s["name"] for s in data["sections"] if s["status"] == "error"]
    if errors:
        log(f"sections with errors: {', '.join(errors)}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
