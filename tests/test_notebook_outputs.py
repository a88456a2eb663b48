"""The outputs committed in the notebooks are those of a run of their current code, cleaned for reading."""
import pathlib
import sys

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import notebook_outputs as no  # noqa: E402

NOTEBOOKS = no.notebooks()
IDS = [str(p.relative_to(ROOT)) for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_outputs_come_from_a_run_of_the_current_code(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert "widgets" not in nb.metadata
    found = no.problems(path)
    prefix = path.name.split("_")[0]
    assert not found, f"{path.relative_to(ROOT)}: {'; '.join(found)}. Refresh its outputs with " \
                      f"`make outputs ARGS=\"--only {prefix}_\"` (or `make test`, then " \
                      f"`python scripts/notebook_outputs.py adopt`) and commit the notebook."


def stream(text, name="stdout"):
    return nbformat.v4.new_output("stream", name=name, text=text)


def test_progress_bars_keep_their_final_state_and_warnings_are_dropped():
    out = no.clean([stream("Map:  10%|#  | 1/10\rMap: 100%|###| 10/10\ndone\n"),
                    stream(f"{ROOT}/x.py:3: UserWarning: careful\n  warnings.warn(x)\nreal error line\n", "stderr"),
                    stream("/a/b.py:9: FutureWarning: soon\n  f()\n", "stderr")])
    assert [o.text for o in out] == ["Map: 100%|###| 10/10\ndone\n", "real error line\n"]


def test_paths_are_made_machine_independent_and_widgets_without_text_dropped():
    home = str(pathlib.Path.home())
    out = no.clean([stream(f"saved {ROOT}/outputs/x and {home}/.cache/m\n"),
                    nbformat.v4.new_output("display_data", data={no.WIDGET: {"model_id": "1"}, "text/plain": "HBox()"}),
                    nbformat.v4.new_output("display_data", data={"text/html": "<progress value='2' max='30'>",
                                                                 "text/plain": "<IPython.core.display.HTML object>"}),
                    nbformat.v4.new_output("execute_result", data={"text/plain": f"'{ROOT}/data'"}, execution_count=1)],
                   root=ROOT)
    assert out[0].text == "saved ./outputs/x and ~/.cache/m\n" and len(out) == 2
    assert out[1].data["text/plain"] == "'./data'"


def test_a_notebook_whose_code_changed_after_its_run_is_stale(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, str(path))
    assert no.problems(path) == ["no outputs from a run of its code"]
    no.stamp(nb, "test machine", "test run")
    nbformat.write(nb, str(path))
    assert no.problems(path) == []
    nb.cells[0].source = "x = 0  # planted: the code changed, the outputs did not"
    nbformat.write(nb, str(path))
    assert "its code changed after its outputs were made" in no.problems(path)[0]


def test_adopt_takes_outputs_only_from_a_run_of_the_same_code(tmp_path, monkeypatch):
    target = NOTEBOOKS[0]
    ran = nbformat.read(target, as_version=4)
    code = [c for c in ran.cells if c.cell_type == "code"]
    code[-1].outputs = [stream("ran\n")]
    no.stamp(ran, "test machine", "test run")
    executed = tmp_path / "executed" / target.relative_to(ROOT)
    executed.parent.mkdir(parents=True)
    nbformat.write(ran, str(executed))
    written = {}
    monkeypatch.setattr(no, "_write", lambda nb, path: written.setdefault(path, nb))
    assert no.adopt(tmp_path / "executed") == [str(target.relative_to(ROOT))]
    adopted = written[target]
    assert [c for c in adopted.cells if c.cell_type == "code"][-1].outputs[0].text == "ran\n"
    code[-1].source += "\n# planted: the run was of other code than the notebook's"
    no.stamp(ran, "test machine", "test run")
    nbformat.write(ran, str(executed))
    written.clear()
    assert no.adopt(tmp_path / "executed") == [] and not written
