"""The series' main job: execute every notebook in order on the current profile, then write the report.

    python scripts/run_series.py                 # all notebooks
    python scripts/run_series.py --only 00b      # notebooks whose file name contains "00b"
    python scripts/run_series.py --part 0        # one Part
    python scripts/run_series.py --resume        # skip notebooks that already succeeded and are unchanged
    python scripts/run_series.py --report-only   # rewrite the report from results/, run nothing

Executed copies (with outputs and plots) go to results/executed/; the numbers the notebooks record go to
results/<profile>/; results/REPORT.md (and REPORT.html, with plots) collects them. `make run` calls this inside
the pinned environment.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import subprocess
import sys
import time

from tqdm.auto import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import cookbook as cb  # noqa: E402
import notebook_outputs  # noqa: E402

EXECUTED = notebook_outputs.EXECUTED
STATUS = EXECUTED / "status.json"
# The comparison table: one row per technique a notebook recorded, these columns where any row has them.
REPORT_COLUMNS = {"notebook": "notebook", "technique": "technique", "task": "task",
                  "trainable_params": "trainable params", "wall_s": "wall time (s)", "tokens_per_s": "tokens/s",
                  "peak_rss_mb": "peak RSS (MB)", "peak_gpu_mb": "peak GPU (MB)", "score_before": "score before",
                  "score": "held-out score", "preference_rate": "preference rate", "reward": "reward",
                  "perplexity": "perplexity", "domain_ppl": "domain perplexity", "size_mb": "size (MiB)",
                  "requests_per_s": "serving req/s"}


def notebooks(part: str | None, only: str | None) -> list[pathlib.Path]:
    found = notebook_outputs.notebooks()
    if part is not None:
        found = [nb for nb in found if nb.parent.name.startswith(f"Part_{part}_")]
    if only:
        found = [nb for nb in found if only in nb.name]
    return found


def digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def execute(path: pathlib.Path, timeout: int) -> tuple[bool, float, str]:
    """Run one notebook in a fresh kernel, cell by cell with a progress bar; save the executed copy, its outputs
    cleaned and stamped with its code's digest (`notebook_outputs.py adopt` takes it into the notebook if it passed)."""
    start = time.perf_counter()
    nb, error = cb.run_notebook(path, timeout=timeout)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = notebook_outputs.clean(cell.outputs)
    if not error:
        notebook_outputs.stamp(nb, notebook_outputs.machine(), f"make run, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    notebook_outputs.write_executed(nb, path)
    return not error, time.perf_counter() - start, error


def collect_losses(notebook: str, outputs: pathlib.Path | None = None) -> pathlib.Path | None:
    """Save the loss curve of every training run a notebook made, for the report: each run's Trainer writes its
    log history into trainer_state.json at every checkpoint under outputs/<notebook>/; the last one holds it all.
    Written to results/<profile>/losses/<notebook>.json as {run: [[step, loss], ...]}; None when it trained nothing."""
    folder = (outputs or cb.ROOT / "outputs") / notebook
    last = {}
    for state in folder.rglob("checkpoint-*/trainer_state.json"):
        run, step = state.parent.parent.relative_to(folder).as_posix(), int(state.parent.name.rsplit("-", 1)[1])
        if step >= last.get(run, (-1, None))[0]:
            last[run] = (step, state)
    curves = {}
    for run, (_, state) in sorted(last.items()):
        history = json.loads(state.read_text())["log_history"]
        points = [[e["step"], e["loss"]] for e in history if isinstance(e.get("loss"), (int, float))]
        if points:
            curves[run if run != "." else "run"] = points
    if not curves:
        return None
    path = cb.RESULTS_DIR / cb.get_profile().name / "losses" / f"{notebook}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(curves, indent=1) + "\n")
    return path


def _loss_plot(folder: pathlib.Path) -> list[str]:
    """One small panel per notebook with its runs' training loss against the step; returns the image file name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = sorted((cb.RESULTS_DIR / cb.get_profile().name / "losses").glob("*.json"))
    if not files:
        return []
    columns = min(3, len(files))
    rows = -(-len(files) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    for ax, file in zip(axes.flat, files):
        for run, points in json.loads(file.read_text()).items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=run[:30])
        ax.set(title=file.stem[:40], xlabel="step", ylabel="training loss")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(files):]:
        ax.axis("off")
    fig.tight_layout()
    name = "report_loss_curves.png"
    fig.savefig(folder / name, dpi=100)
    plt.close(fig)
    return [name]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _labelled_scatter(ax, rows: list[dict], x: str, y: str, label_chars: int) -> None:
    ax.scatter([r[x] for r in rows], [r[y] for r in rows])
    for r in rows:
        ax.annotate(f"{r['notebook'].split('_')[0]} {r['technique']}"[:label_chars], (r[x], r[y]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")


def _plots(rows: list[dict], folder: pathlib.Path) -> list[str]:
    """Held-out score vs training time (training runs only: rows with trainable parameters, one panel per task, as
    scores of different tasks are not comparable) and size vs perplexity; returns the image file names."""
    import matplotlib
    matplotlib.use("Agg")  # the report is written without a screen
    import matplotlib.pyplot as plt
    written = []
    trained = [r for r in rows if isinstance(r.get("trainable_params"), (int, float)) and
               isinstance(r.get("wall_s"), (int, float)) and isinstance(r.get("score"), (int, float))]
    tasks = sorted({r.get("task", "") for r in trained})
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
        for ax, task in zip(axes.flat, tasks):
            _labelled_scatter(ax, [r for r in trained if r.get("task", "") == task], "wall_s", "score", 28)
            ax.set(title=task, xlabel="training wall time (s)", ylabel="held-out score", ylim=(-0.05, 1.05))
        fig.suptitle("Held-out score vs training time, per task (training runs only)")
        fig.tight_layout()
        fig.savefig(folder / "report_score_vs_time.png", dpi=100)
        plt.close(fig)
        written.append("report_score_vs_time.png")
    sized = [r for r in rows if isinstance(r.get("size_mb"), (int, float)) and isinstance(r.get("perplexity"), (int, float))]
    if sized:
        fig, ax = plt.subplots(figsize=(7, 4))
        _labelled_scatter(ax, sized, "size_mb", "perplexity", 32)
        ax.set(xlabel="size on disk (MiB)", ylabel="held-out perplexity", title="Size vs perplexity (Part 4 yardstick)")
        fig.tight_layout()
        fig.savefig(folder / "report_size_vs_perplexity.png", dpi=100)
        plt.close(fig)
        written.append("report_size_vs_perplexity.png")
    return written


README_BLOCK = ("<!-- results:start -->", "<!-- results:end -->")


def headline_table(rows: list[dict]) -> str:
    """The README's results table: every technique recorded with a held-out figure before and after it, on the
    metric it trains for (preference rate for preference training, else the task's held-out score)."""
    lines = ["| notebook | technique | task | held-out metric | before → after | wall time (s) | measured on |",
             "|---|---|---|---|---|---:|---|"]
    for r in rows:
        metric = "preference_rate" if "preference_rate_before" in r else "score"
        before, after = r.get(f"{metric}_before"), r.get(metric)
        if isinstance(before, (int, float)) and isinstance(after, (int, float)):
            lines.append(f"| {r['notebook'].split('_')[0]} | {r['technique']} | {r.get('task', '')} | "
                         f"{metric.replace('_', ' ')} | {before:.2f} → {after:.2f} | {_cell(r.get('wall_s'))} | "
                         f"{r.get('machine', 'not recorded')} |")
    return "\n".join(lines)


def render_readme(rows: list[dict], readme: pathlib.Path | None = None) -> bool:
    """Rewrite the table between README_BLOCK's markers from the results; True when it changed."""
    readme = readme or cb.ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(README_BLOCK[0]) + len(README_BLOCK[0]), text.index(README_BLOCK[1])
    new = text[:start] + "\n" + headline_table(rows) + "\n" + text[end:]
    if new != text:
        readme.write_text(new)
    return new != text


def status_from_timings(path: pathlib.Path | None = None) -> dict:
    """The notebooks' outcomes and wall times as the last test run recorded them (results/timings.json)."""
    path = path or cb.RESULTS_DIR / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    return {name: {"ok": t["outcome"] == "passed", "wall_s": t["wall_s"], "error": t["outcome"],
                   "run": f"make test, {t['measured_at']}, {t.get('machine', '?')}"} for name, t in timings.items()}


def write_report(status: dict, folder: pathlib.Path | None = None) -> pathlib.Path:
    """results/REPORT.md (and REPORT.html beside it): the notebooks' outcomes and wall times from `status`, a failed
    one named with its cell and error, and every technique the notebooks recorded in results/<profile>/."""
    import mistune
    folder = folder or cb.RESULTS_DIR
    profile = cb.get_profile()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cb.ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    rows = cb.load_results(profile)
    machines = sorted({r.get("machine", "not recorded") for r in rows})
    lines = [f"# Series report ({profile.name} profile)", "",
             "Written by `make run` from `results/`. Every number below was measured by a notebook in this run "
             "or an earlier one; each notebook's committed outputs show the run its figures come from.", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit `{commit}`. "
             f"Measured on: {'; '.join(machines) or 'nothing recorded yet'}.", "",
             "## Notebooks", "", "Wall time from kernel start to the last cell, from "
             f"{'; '.join(sorted({st.get('run', 'this make run') for st in status.values()})) or 'no run yet'}. "
             "Timings and peak memory per machine: [`TIMINGS.md`](TIMINGS.md).", "",
             "| notebook | outcome | wall time (s) |", "|---|---|---:|"]
    for name, st in sorted(status.items()):
        lines.append(f"| [`{name}`](../{name}) | {'ok' if st['ok'] else 'FAILED at ' + st['error']} | "
                     f"{st['wall_s']:.0f} |")
    failed = sum(not st["ok"] for st in status.values())
    lines.append(f"| **total** ({len(status)} notebooks, {failed} failed) | | "
                 f"**{sum(st['wall_s'] for st in status.values()):.0f}** |")
    if rows:
        keys = [k for k in REPORT_COLUMNS if any(r.get(k) not in (None, "") for r in rows)]
        lines += ["", "## Techniques side by side", "",
                  "One row per technique a notebook recorded; every field is in `results/<profile>/*.json`.", "",
                  "| " + " | ".join(REPORT_COLUMNS[k] for k in keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
        images = _plots(rows, folder) + _loss_plot(folder)
        if images:
            lines += ["", "## Plots", ""] + [f"![{name[7:-4].replace('_', ' ')}]({name})" for name in images]
    text = "\n".join(lines) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "REPORT.md"
    path.write_text(text)
    html = mistune.create_markdown(plugins=["table"])(text)
    (folder / "REPORT.html").write_text(f"<!doctype html><meta charset='utf-8'><title>Series report</title>\n"
                                        f"<style>body{{font-family:sans-serif}} td,th{{border:1px solid #ccc;"
                                        f"padding:2px 6px}} table{{border-collapse:collapse}}</style>\n{html}")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", help="run one Part, e.g. 0")
    parser.add_argument("--only", help="run notebooks whose file name contains this text")
    parser.add_argument("--resume", action="store_true", help="skip notebooks that succeeded and are unchanged")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    parser.add_argument("--report-only", action="store_true", help="write the report from results/, run nothing")
    args = parser.parse_args()

    if args.report_only:  # the notebooks as the last test run (the one that made their committed outputs) saw them
        print(f"report: {write_report(status_from_timings())}")
        print(f"README results table {'rewritten' if render_readme(cb.load_results()) else 'unchanged'}")
        return 0

    status = json.loads(STATUS.read_text()) if STATUS.exists() else {}
    selected = notebooks(args.part, args.only)
    if not selected:
        print(f"no notebook matches --part={args.part} --only={args.only}", file=sys.stderr)
        return 2
    failed = []
    for path in tqdm(selected, desc="series", unit="notebook"):
        name = str(path.relative_to(cb.ROOT))
        previous = status.get(name, {})
        if args.resume and previous.get("ok") and previous.get("digest") == digest(path):
            tqdm.write(f"skip   {name} (succeeded before, unchanged)")
            continue
        ok, wall, error = execute(path, args.timeout)
        collect_losses(path.stem)
        status[name] = {"ok": ok, "wall_s": round(wall, 1), "error": error, "digest": digest(path)}
        STATUS.parent.mkdir(parents=True, exist_ok=True)
        STATUS.write_text(json.dumps(status, indent=2, sort_keys=True) + "\n")
        tqdm.write(f"{'ok    ' if ok else 'FAILED'} {name} in {wall:.0f} s{'' if ok else ': ' + error}")
        if not ok:
            failed.append(name)
    report = write_report(status)
    render_readme(cb.load_results())
    print(f"report: {report}\nexecuted notebooks: {EXECUTED}")
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)}; rerun with --resume after fixing",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
