"""The series' main job: execute every notebook in order on the current profile, then write the report.

    python scripts/run_series.py                 # all notebooks
    python scripts/run_series.py --only 00b      # notebooks whose file name contains "00b"
    python scripts/run_series.py --part 0        # one Part
    python scripts/run_series.py --resume        # skip notebooks that already succeeded and are unchanged

Executed copies (with outputs and plots) go to results/executed/; the numbers the notebooks record go to
results/<profile>/; results/REPORT.md collects them. `make run` calls this inside the pinned environment.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import time

import nbformat
from tqdm.auto import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import cookbook as cb  # noqa: E402

EXECUTED = cb.RESULTS_DIR / "executed"
STATUS = EXECUTED / "status.json"
REPORT_COLUMNS = ["notebook", "technique", "task", "score_before", "score", "trainable_params", "wall_s", "s_per_step",
                  "tokens_per_s", "peak_rss_mb", "peak_gpu_mb", "preference_rate", "reward"]


def notebooks(part: str | None, only: str | None) -> list[pathlib.Path]:
    found = sorted(cb.ROOT.glob("Part_*/*.ipynb")) + sorted(cb.ROOT.glob("Appendix/*.ipynb"))
    if part is not None:
        found = [nb for nb in found if nb.parent.name.startswith(f"Part_{part}_")]
    if only:
        found = [nb for nb in found if only in nb.name]
    return found


def digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def execute(path: pathlib.Path, timeout: int) -> tuple[bool, float, str]:
    """Run one notebook in a fresh kernel, cell by cell with a progress bar; save the executed copy."""
    start = time.perf_counter()
    nb, error = cb.run_notebook(path, timeout=timeout)
    out = EXECUTED / path.parent.name / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(out))
    return not error, time.perf_counter() - start, error


def write_report(status: dict) -> pathlib.Path:
    profile = cb.get_profile()
    lines = [f"# Series report ({profile.name} profile)", "",
             "Written by `make run` from `results/`. Every number below was measured by a notebook in this run "
             "or an earlier one (see each notebook's executed copy in `results/executed/`).", "",
             "## Notebooks", "", "| notebook | outcome | wall time (s) |", "|---|---|---:|"]
    for name, st in sorted(status.items()):
        lines.append(f"| `{name}` | {'ok' if st['ok'] else 'FAILED: ' + st['error']} | {st['wall_s']:.0f} |")
    lines.append(f"| **total** | | **{sum(st['wall_s'] for st in status.values()):.0f}** |")
    rows = cb.load_results(profile)
    if rows:
        keys = [k for k in REPORT_COLUMNS if any(k in r for r in rows)]
        lines += ["", "## Results", "", "Full entries (every recorded field) are in `results/<profile>/*.json`.", "",
                  "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            cells = [r.get(k, "") for k in keys]
            lines.append("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    path = cb.RESULTS_DIR / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", help="run one Part, e.g. 0")
    parser.add_argument("--only", help="run notebooks whose file name contains this text")
    parser.add_argument("--resume", action="store_true", help="skip notebooks that succeeded and are unchanged")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args()

    selected = notebooks(args.part, args.only)
    if not selected:
        print(f"no notebook matches --part={args.part} --only={args.only}", file=sys.stderr)
        return 2
    status = json.loads(STATUS.read_text()) if STATUS.exists() else {}
    failed = []
    for path in tqdm(selected, desc="series", unit="notebook"):
        name = str(path.relative_to(cb.ROOT))
        previous = status.get(name, {})
        if args.resume and previous.get("ok") and previous.get("digest") == digest(path):
            tqdm.write(f"skip   {name} (succeeded before, unchanged)")
            continue
        ok, wall, error = execute(path, args.timeout)
        status[name] = {"ok": ok, "wall_s": round(wall, 1), "error": error, "digest": digest(path)}
        STATUS.parent.mkdir(parents=True, exist_ok=True)
        STATUS.write_text(json.dumps(status, indent=2, sort_keys=True) + "\n")
        tqdm.write(f"{'ok    ' if ok else 'FAILED'} {name} in {wall:.0f} s{'' if ok else ': ' + error}")
        if not ok:
            failed.append(name)
    report = write_report(status)
    print(f"report: {report}\nexecuted notebooks: {EXECUTED}")
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)}; rerun with --resume after fixing",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
