"""The scaling benchmark's report: its table, its verdict on the two claims, and its plot."""

from __future__ import annotations

from pathlib import Path

STAGES = ("swinir", "cond_encoder", "flow_unet", "vae_decoder", "colour_fix")
MIB = 1024 * 1024


def mib_text(b: float | None) -> str:
    return "-" if b is None else f"{b / MIB:,.0f}"


def format_table(rows: list[dict]) -> str:
    head = (f"{'MP':>6} {'H x W':>11} {'wall s':>8} {'s/MP':>7} "
            + " ".join(f"{s[:8]:>8}" for s in STAGES)
            + f" {'peak+ MiB':>10} {'image MiB':>10} {'work MiB':>9} {'peak/img':>8} {'cpu s':>8} {'load':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        stage_s = " ".join(f"{(r['stages'][s]['seconds'] or 0):8.2f}" for s in STAGES)
        lines.append(f"{r['megapixels']:6.2f} {r['h']:>5}x{r['w']:<5} {r['wall_s']:8.2f} {r['seconds_per_megapixel']:7.2f} "
                     f"{stage_s} {mib_text(r['peak_increase_bytes']):>10} {mib_text(r['image_sized_bytes']):>10} "
                     f"{mib_text(r['working_bytes']):>9} {r['peak_increase_in_images']:8.2f} "
                     f"{(r.get('cpu_s') or float('nan')):8.1f} {(r.get('loadavg_1min_mean') or float('nan')):5.1f}")
    return "\n".join(lines)


def format_claims(claims: dict) -> str:
    out = []
    mem = claims.get("memory_flat", {})
    if "peak_increase_ratio" in mem:
        def fmt(v):
            return "n/a" if v is None else f"{v:.2f}x"
        out.append(f"memory {mem['from_mp']:.2f} -> {mem['to_mp']:.2f} MP (pixels x{mem['pixel_ratio']:.2f}): "
                   f"total peak {fmt(mem['peak_increase_ratio'])} "
                   f"[{'HOLDS' if mem['total_holds'] else 'FAILS'} <= {claims['flat_limit']}x], "
                   f"working memory above image-sized buffers {fmt(mem['working_ratio'])} "
                   f"[{'HOLDS' if mem['working_holds'] else 'FAILS'}], image-sized buffers {fmt(mem['image_sized_ratio'])}")
    else:
        out.append(f"memory: {mem.get('note', 'not checked')}")
    t = claims.get("time_linear")
    if t:
        rel = ", ".join(f"{v:.2f}" for v in t["time_per_pixel_vs_anchor"])
        slope = "n/a" if t["loglog_slope"] is None else f"{t['loglog_slope']:.3f}"
        work = ", ".join(f"{v:.2f}" for v in t["measured_vs_tiled_work_prediction"])
        out.append(f"time: per-pixel time relative to {t['anchor_mp']:.2f} MP = [{rel}], log-log slope {slope}: "
                   f"linear within +-{claims['linear_tolerance']:.0%} {'HOLDS' if t['holds'] else 'FAILS'}, "
                   f"at most linear {'HOLDS' if t['at_most_linear'] else 'FAILS'}")
        if t.get("cpu_time_per_pixel_vs_anchor"):
            cpu_rel = ", ".join(f"{v:.2f}" for v in t["cpu_time_per_pixel_vs_anchor"])
            out.append(f"      CPU time per pixel relative to {t['anchor_mp']:.2f} MP = [{cpu_rel}]")
        out.append(f"      measured / (linear in tiled pixels processed) = [{work}]: "
                   f"{'HOLDS' if t['holds_vs_tiled_work'] else 'FAILS'} within +-{claims['linear_tolerance']:.0%}")
    return "\n".join(out)


def plot(rows: list[dict], claims: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    mp = [r["megapixels"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    ax_t.plot(mp, [r["wall_s"] for r in rows], "o-", color="black", lw=2, label=f"end to end ({rows[0].get('path', 'run_batch')})")
    for name in STAGES:
        ys = [r["stages"][name]["seconds"] for r in rows]
        if all(y is not None and y > 0 for y in ys):
            ax_t.plot(mp, ys, ".--", lw=1, label=name)
    ideal = [rows[0]["wall_s"] * r["pixels"] / rows[0]["pixels"] for r in rows]
    ax_t.plot(mp, ideal, ":", color="red", lw=1.5, label=f"ideal linear in pixels from {mp[0]:.2g} MP")
    predicted = claims.get("time_linear", {}).get("predicted_by_tiled_work_s")
    if predicted:
        ax_t.plot(mp, predicted, ":", color="grey", lw=1.5, label="linear in tiled pixels processed")
    ax_t.set_xscale("log", base=2)
    ax_t.set_yscale("log")
    ax_t.set_xlabel("megapixels")
    ax_t.set_ylabel("seconds")
    ax_t.set_title("time vs image size (log-log)")
    ax_t.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)

    ax_m.plot(mp, [r["peak_increase_bytes"] / MIB for r in rows], "o-", color="black", lw=2,
              label="peak above model + input (total)")
    if all(r["image_sized_bytes"] is not None for r in rows):
        ax_m.plot(mp, [r["image_sized_bytes"] / MIB for r in rows], "s--", label="image-sized buffers (null networks)")
    if all(r["working_bytes"] is not None for r in rows):
        ax_m.plot(mp, [r["working_bytes"] / MIB for r in rows], "^-", label="working memory above image-sized buffers")
    mem = claims.get("memory_flat", {})
    if "peak_increase_ratio" in mem:
        # The claim: the total at the largest size stays under this line.
        ax_m.axhline(rows[-2]["peak_increase_bytes"] * claims["flat_limit"] / MIB, color="red", ls=":", lw=1,
                     label=f"{claims['flat_limit']}x the total at {rows[-2]['megapixels']:.3g} MP (the limit)")
    ax_m.set_xscale("log", base=2)
    for ax in (ax_t, ax_m):
        ax.set_xticks(mp, [f"{m:.3g}" for m in mp])
        ax.xaxis.set_minor_locator(NullLocator())
    ax_m.set_xlabel("megapixels")
    ax_m.set_ylabel("MiB")
    ax_m.set_title(f"peak memory ({rows[0].get('memory_kind', '')})")
    ax_m.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


