"""The outputs committed in the notebooks: cleaned, stamped with the code they came from, checked for staleness.

Machinery, not a lesson. A test run (`make test`, through conftest.py) and `make run` write executed copies of the
notebooks to results/executed/ (ignored by git), cleaned for reading and stamped with the digest of the code that
produced them. Then:

    python scripts/notebook_outputs.py adopt    # copy the executed copies whose code is current into the notebooks
    python scripts/notebook_outputs.py check    # list notebooks whose outputs are missing or stale

`make outputs ARGS="--only 07"` does both for one notebook: runs it, then adopts its outputs.
tests/test_notebook_outputs.py runs `check` in the test command.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import sys

import nbformat

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from cookbook import _write_atomically, machine  # noqa: E402,F401  (machine: stamped into each executed notebook)

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXECUTED = ROOT / "results" / "executed"
# What a notebook's outputs depend on besides its own code cells: the helper it imports and the data generator.
SHARED_CODE = ("scripts/cookbook.py", "scripts/make_datasets.py")
STAMP = "cookbook"                       # notebook metadata key: {"code_digest": ..., "machine": ..., "run": ...}
MAX_NOTEBOOK_BYTES = 1_000_000           # outputs included; plots are saved small enough to keep under it
WIDGET = "application/vnd.jupyter.widget-view+json"
WARNING_LINE = re.compile(r"^\S.*?:\d+: \w*Warning: ")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def notebooks() -> list[pathlib.Path]:
    return sorted(ROOT.glob("Part_*/*.ipynb")) + sorted(ROOT.glob("Appendix/*.ipynb"))


def code_digest(nb) -> str:
    """sha256 of the notebook's code cells that run (in order; cells marked NBVAL_SKIP, the Colab bootstrap, never run
    here and make no output) and of SHARED_CODE: change any of them and the outputs are stale."""
    h = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code" and "NBVAL_SKIP" not in cell.source:
            h.update(cell.source.encode() + b"\0")
    for name in SHARED_CODE:
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()[:16]


def _public_paths(text: str, root: pathlib.Path) -> str:
    """Machine-specific absolute paths become repo-relative (./...) or home-relative (~/...)."""
    text = text.replace(str(root) + "/", "./").replace(str(root), ".")
    home = os.path.expanduser("~")
    return text.replace(home + "/", "~/") if home not in ("/", "") else text


def _readable_stderr(text: str) -> str:
    """stderr without Python warnings (each is a 'file:line: XWarning: ...' line and the source line after it)."""
    kept, skip_next = [], False
    for line in text.splitlines(keepends=True):
        if WARNING_LINE.match(line):
            skip_next = True
            continue
        if skip_next and line.startswith((" ", "\t")):
            skip_next = False
            continue
        skip_next = False
        kept.append(line)
    return "".join(kept)


def clean(outputs: list, root: pathlib.Path = ROOT) -> list:
    """Outputs as a reader should see them: progress widgets and the Trainer's HTML progress table dropped (the
    kernel sends their later states as display updates, which are not outputs: what is left is the empty first
    state), text progress bars at their final line, warnings dropped, paths made machine-independent."""
    cleaned = []
    for out in outputs:
        out = nbformat.from_dict(dict(out))
        if out.output_type == "stream":
            text = "\n".join(line.split("\r")[-1] for line in out.text.split("\n"))
            text = _readable_stderr(text) if out.name == "stderr" else text
            if not text.strip():
                continue
            out.text = _public_paths(text, root)
        elif out.output_type in ("display_data", "execute_result"):
            data = {mime: value for mime, value in out.data.items() if mime != WIDGET}
            if WIDGET in out.data and set(data) <= {"text/plain"} or "<progress" in str(data.get("text/html", "")):
                continue  # a progress display as first shown: its later states are display updates, not outputs
            out.data = {mime: _public_paths(value, root) if isinstance(value, str) and not mime.startswith("image/")
                        else value for mime, value in data.items()}
            out.setdefault("metadata", {})
        elif out.output_type == "error":
            out.traceback = [_public_paths(ANSI.sub("", line), root) for line in out.traceback]
        cleaned.append(out)
    return cleaned


def stamp(nb, machine: str, run: str) -> None:
    nb.metadata[STAMP] = {"code_digest": code_digest(nb), "machine": machine, "run": run}
    nb.metadata.pop("widgets", None)


def _write(nb, path: pathlib.Path) -> None:
    """Atomic, as the helper writes results: a reader (or a kill mid-write) never leaves half a notebook."""
    text = nbformat.writes(nb)
    _write_atomically(path, text if text.endswith("\n") else text + "\n")


def write_executed(nb, path: pathlib.Path) -> pathlib.Path:
    """Save an executed, cleaned, stamped notebook under results/executed/."""
    out = EXECUTED / path.resolve().relative_to(ROOT)
    _write(nb, out)
    return out


def problems(path: pathlib.Path) -> list[str]:
    """Why the committed notebook's outputs cannot be trusted as the outputs of its current code ([] when they can)."""
    nb = nbformat.read(path, as_version=4)
    info = nb.metadata.get(STAMP)
    if not info:
        return ["no outputs from a run of its code"]
    found = []
    if info.get("code_digest") != code_digest(nb):
        found.append(f"its code changed after its outputs were made (stamped {info.get('code_digest')}, "
                     f"now {code_digest(nb)})")
    size = path.stat().st_size
    if size > MAX_NOTEBOOK_BYTES:
        found.append(f"{size / 1e6:.1f} MB with outputs, over the {MAX_NOTEBOOK_BYTES / 1e6:.0f} MB cap")
    return found


def adopt(executed: pathlib.Path = EXECUTED) -> list[str]:
    """Copy the outputs (and stamp) of each executed copy whose code equals the committed notebook's into it."""
    adopted = []
    for target in notebooks():
        copy = executed / target.relative_to(ROOT)
        if not copy.exists():
            continue
        nb, run = nbformat.read(target, as_version=4), nbformat.read(copy, as_version=4)
        if run.metadata.get(STAMP, {}).get("code_digest") != code_digest(nb):
            print(f"skip   {target.relative_to(ROOT)}: its executed copy ran other code")
            continue
        # Same code digest, so the code cells pair up one to one; markdown may have been edited since the run.
        code = [c for c in nb.cells if c.cell_type == "code"]
        for cell, ran in zip(code, [c for c in run.cells if c.cell_type == "code"]):
            cell.outputs, cell.execution_count = ran.outputs, ran.execution_count
        nb.metadata[STAMP] = run.metadata[STAMP]
        _write(nb, target)
        adopted.append(str(target.relative_to(ROOT)))
        print(f"adopted {target.relative_to(ROOT)}")
    return adopted


def main(argv: list[str]) -> int:
    if argv[1:] not in (["adopt"], ["check"]):
        print(__doc__)
        return 2
    if argv[1] == "adopt":
        adopt()
    stale = {str(p.relative_to(ROOT)): problems(p) for p in notebooks()}
    for name, found in stale.items():
        if found:
            print(f"stale  {name}: {'; '.join(found)}")
    return 1 if argv[1] == "check" and any(stale.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
