"""Render pytest-benchmark JSON files as one Markdown table per benchmark group, with ratios
against the reference measured in the same run.

    python benchmarks/render.py results/cpu/temporal_loss.json > results/cpu/temporal_loss.md
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def label(row):
    e = row["extra_info"]
    return e.get("backend") or e.get("impl") or row["name"]


def fmt_bytes(n):
    if n is None:
        return "n/a"
    if isinstance(n, str):  # e.g. "oom" recorded by a suite
        return n
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def render(paths):
    groups = defaultdict(list)
    machine = None
    for p in paths:
        data = json.load(open(p))
        machine = machine or data.get("machine_info", {})
        for b in data["benchmarks"]:
            groups[b["group"]].append(b)
    lines = []
    if machine:
        lines.append(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
                     f"{machine.get('system', '')} {machine.get('release', '')}")
    for g, rows in groups.items():
        info0 = rows[0]["extra_info"]
        if "gpu" in info0:
            lines.append(f"GPU: {info0['gpu']} (copy bandwidth {info0.get('copy_bandwidth_GBps', 0):.0f} GB/s), "
                         f"torch {info0.get('torch')}")
        lines.append(f"\n### {g}\n")
        # the baseline row: the reference backend, or the naive algorithm (pair-wise suite)
        ref = next((r for r in rows if label(r) in ("reference", "naive")), None)
        has_bw = any("achieved_GBps" in r["extra_info"] for r in rows)
        # speed of light: compulsory bytes / measured copy bandwidth, against the min time
        has_sol = all("sol_bytes" in r["extra_info"] and "copy_bandwidth_GBps" in r["extra_info"] for r in rows)
        head = "| backend | mean time | min time | speed-up vs reference | peak extra memory | memory vs reference |"
        if has_bw:
            head += " achieved GB/s | of copy bandwidth |"
        if has_sol:
            head += " SOL ms | % of SOL |"
        # the pair-wise suite: executed TFLOP/s of the blocked kernels against the dense peak
        has_fl = any("executed_TFLOPs" in r["extra_info"] for r in rows)
        if has_fl:
            head += " x inputs | TFLOP/s | % of dense peak |"
        lines.append(head)
        lines.append("|" + "---|" * (head.count("|") - 1))
        for r in rows:
            e, s = r["extra_info"], r["stats"]
            speed = f"{ref['stats']['mean'] / s['mean']:.2f}x" if ref else "n/a"
            pm, rm = e.get("peak_extra_bytes"), (ref or {}).get("extra_info", {}).get("peak_extra_bytes")
            numeric = isinstance(pm, (int, float)) and isinstance(rm, (int, float)) and rm
            mem = f"{pm / rm:.2f}" if numeric else "n/a"
            row = f"| {label(r)} | {s['mean'] * 1e3:.2f} ms | {s['min'] * 1e3:.2f} ms | {speed} | {fmt_bytes(pm)} | {mem} |"
            if has_bw:
                row += f" {e.get('achieved_GBps', 0):.0f} | {100 * e.get('fraction_of_copy_bw', 0):.0f}% |"
            if has_sol:
                sol = e["sol_bytes"] / (e["copy_bandwidth_GBps"] * 1e9)
                row += f" {sol * 1e3:.2f} | {100 * sol / s['min']:.0f}% |"
            if has_fl:
                over, fl, peak = e.get("peak_over_inputs"), e.get("executed_TFLOPs"), e.get("dense_peak_TFLOPs")
                row += (f" {over:.2f} |" if over is not None else " – |") + (f" {fl:.1f} |" if fl else " – |")
                row += f" {100 * fl / peak:.0f}% of {peak:g} |" if fl and peak else " – |"
            lines.append(row)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(sys.argv[1:]))
