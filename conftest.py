"""Per-notebook timing table and executed copies, refreshed by every test run that executes notebooks (nbval).

For each notebook: wall time (kernel start to the last cell), the kernel's peak resident memory (VmHWM), the
outcome, its three slowest cells (where to look first when a notebook must get faster) and the machine. Written
to results/timings.json (merged: notebooks not run this time keep their last figures) and rendered as
results/TIMINGS.md with one total per machine. Each notebook that ran whole and passed is also saved with its outputs (cleaned and
stamped with its code's digest) to results/executed/, from where `python scripts/notebook_outputs.py adopt` copies
them into the committed notebooks.
"""
import datetime as dt
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "scripts"))
import notebook_outputs  # noqa: E402

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


def pytest_runtest_setup(item):
    # nbval waits 5 s (fixed) for the kernel's next output message after a cell's reply, then stops the kernel and
    # marks every later cell xfail. A kernel that has just flushed a native library's stderr (llama.cpp's quantizer
    # in 09) can take longer than that on a loaded 2-core machine.
    if hasattr(item, "output_timeout"):
        item.output_timeout = 60


def pytest_runtest_teardown(item):
    notebook = _notebook_of(item.nodeid)
    pid = _kernel_pid(item) if notebook else None
    peak = _peak_rss_mb(pid) if pid else None
    if peak is not None:
        run = _runs.setdefault(notebook, {"wall_s": 0.0, "cells": 0, "failed": 0, "peak_rss_mb": 0.0})
        run["peak_rss_mb"] = max(run["peak_rss_mb"], peak)
    if notebook and getattr(item, "test_outputs", None) is not None:
        nb = item.parent.nb  # nbval's copy of the notebook: each cell gets its outputs as it runs
        item.cell.outputs = notebook_outputs.clean(item.test_outputs)
        code = [c for c in nb.cells if c.cell_type == "code"]
        item.cell.execution_count = 1 + sum(c.get("execution_count") is not None for c in code if c is not item.cell)
        run = _runs.get(notebook, {})
        # Saved when its last cell has run, if every cell ran (not a -k slice) and passed.
        if item.cell is code[-1] and run.get("cells") == len(code) and not run.get("failed"):
            when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            notebook_outputs.stamp(nb, notebook_outputs.machine(), f"make test, {when}")
            notebook_outputs.write_executed(nb, ROOT / notebook)


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
                         "profile": profile, "measured_at": stamp, "machine": notebook_outputs.machine()}
    TIMINGS_JSON.parent.mkdir(exist_ok=True)
    TIMINGS_JSON.write_text(json.dumps(timings, indent=2, sort_keys=True) + "\n")
    TIMINGS_MD.write_text(render_markdown(timings))
