"""Per-notebook timing table, refreshed by every test run that executes notebooks (nbval).

For each notebook: wall time (kernel start to the last cell), the kernel's peak resident memory (VmHWM) and
the outcome. Written to results/timings.json (merged: notebooks not run this time keep their last figures)
and rendered as results/TIMINGS.md with the totals.
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
    if report.failed:
        run["failed"] += 1


def render_markdown(timings: dict) -> str:
    lines = ["# Notebook timings", "",
             "Written by the test run (`make test`, nbval): wall time from kernel start to the last cell, and the",
             "kernel's peak resident memory. Child processes a notebook starts (servers, CLIs) are not included.", "",
             "| notebook | profile | wall time (s) | peak RSS (MB) | cells | outcome | measured |",
             "|---|---|---:|---:|---:|---|---|"]
    for name in sorted(timings):
        t = timings[name]
        lines.append(f"| `{name}` | {t['profile']} | {t['wall_s']:.1f} | {t['peak_rss_mb']:.0f} | {t['cells']} | "
                     f"{t['outcome']} | {t['measured_at']} |")
    total = sum(t["wall_s"] for t in timings.values())
    peak = max((t["peak_rss_mb"] for t in timings.values()), default=0)
    lines += [f"| **total ({len(timings)} notebooks)** | | **{total:.1f}** | **{peak:.0f}** (max) | | | |", ""]
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
                         "profile": profile, "measured_at": stamp}
    TIMINGS_JSON.parent.mkdir(exist_ok=True)
    TIMINGS_JSON.write_text(json.dumps(timings, indent=2, sort_keys=True) + "\n")
    TIMINGS_MD.write_text(render_markdown(timings))
