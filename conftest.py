"""Per-notebook timing table, refreshed by every test run that executes notebooks (nbval).

For each notebook: wall time (kernel start to the last cell), the kernel's peak resident memory (VmHWM), the
outcome, its three slowest cells (where to look first when a notebook must get faster) and the machine. Written
to results/timings.json (merged: notebooks not run this time keep their last figures) and rendered as
results/TIMINGS.md with one total per machine.
"""
import datetime as dt
import json
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent
TIMINGS_JSON = ROOT / "results" / "timings.json"
TIMINGS_MD = ROOT / "results" / "TIMINGS.md"
_runs: dict[str, dict] = {}


def _notebook_of(nodeid: str) -> str | None:
    path = nodeid.split("::", 1)[0]
    return path if path.endswith(".ipynb") else None


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _kernel_pid(item) -> int | None:
    kernel = getattr(item.parent, "kernel", None)
    process = getattr(getattr(getattr(kernel, "km", None), "provisioner", None), "process", None)
    return getattr(process, "pid", None)


def pytest_runtest_teardown(item):
    notebook = _notebook_of(item.nodeid)
    pid = _kernel_pid(item) if notebook else None
    peak = _peak_rss_mb(pid) if pid else None
    if peak is not None:
        run = _runs.setdefault(notebook, {"wall_s": 0.0, "cells": 0, "failed": 0, "peak_rss_mb": 0.0})
        run["peak_rss_mb"] = max(run["peak_rss_mb"], peak)


def pytest_runtest_logreport(report):
    notebook = _notebook_of(report.nodeid)
    if not notebook:
        return
    run = _runs.setdefault(notebook, {"wall_s": 0.0, "cells": 0, "failed": 0, "peak_rss_mb": 0.0})
    run["wall_s"] += report.duration
    if report.when == "call":
        run["cells"] += 1
        run.setdefault("cell_s", {})[report.nodeid.split("::", 1)[-1]] = report.duration
    if report.failed:
        run["failed"] += 1


def machine() -> str:
    """e.g. "AMD EPYC, 2 cores, avx2": the same notebook runs 2-3x slower on some CPUs of the same size."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    simd = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no avx")
    return f"{name}, {len(os.sched_getaffinity(0))} cores, {simd}"


def render_markdown(timings: dict) -> str:
    lines = ["# Notebook timings", "",
             "Written by the test run (`make test`, nbval): wall time from kernel start to the last cell, and the",
             "kernel's peak resident memory. Child processes a notebook starts (servers, CLIs) are not included.",
             "Machines of the same size differ (2-3x between CPU models seen): compare rows of the same machine.",
             "Slowest cells: `#N` is the notebook's Nth code cell, counted from 0 (nbval's numbering).", "",
             "| notebook | profile | wall time (s) | peak RSS (MB) | cells | slowest cells (s) | outcome | measured | machine |",
             "|---|---|---:|---:|---:|---|---|---|---|"]
    for name in sorted(timings):
        t = timings[name]
        slowest = ", ".join(f"{cell.replace('Cell ', '#')}: {s:.0f}" for cell, s in t.get("slowest_cells", []))
        lines.append(f"| `{name}` | {t['profile']} | {t['wall_s']:.1f} | {t['peak_rss_mb']:.0f} | {t['cells']} | "
                     f"{slowest} | {t['outcome']} | {t['measured_at']} | {t.get('machine', '?')} |")
    # One total per machine: a sum across machines of different speed would mean nothing.
    machines = sorted({t.get("machine", "?") for t in timings.values()})
    for name in machines:
        rows = [t for t in timings.values() if t.get("machine", "?") == name]
        total, peak = sum(t["wall_s"] for t in rows), max(t["peak_rss_mb"] for t in rows)
        lines.append(f"| **total ({len(rows)} notebooks)** | | **{total:.1f}** | **{peak:.0f}** (max) | | | | | {name} |")
    lines.append("")
    return "\n".join(lines)


def pytest_sessionfinish(session):
    if not _runs or os.environ.get("COOKBOOK_NO_TIMINGS"):
        return
    timings = json.loads(TIMINGS_JSON.read_text()) if TIMINGS_JSON.exists() else {}
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    profile = os.environ.get("COOKBOOK_PROFILE", "cpu")
    for name, run in _runs.items():
        timings[name] = {"wall_s": round(run["wall_s"], 1), "peak_rss_mb": round(run["peak_rss_mb"]),
                         "cells": run["cells"], "outcome": "failed" if run["failed"] else "passed",
                         "slowest_cells": [[cell, round(s, 1)] for cell, s in
                                           sorted(run.get("cell_s", {}).items(), key=lambda kv: -kv[1])[:3]],
                         "profile": profile, "measured_at": stamp, "machine": machine()}
    TIMINGS_JSON.parent.mkdir(exist_ok=True)
    TIMINGS_JSON.write_text(json.dumps(timings, indent=2, sort_keys=True) + "\n")
    TIMINGS_MD.write_text(render_markdown(timings))
