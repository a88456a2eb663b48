"""Static checks of every notebook: the anatomy in CONTRIBUTING.md, kept by a test rather than by memory."""
import ast
import json
import pathlib
import re

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(ROOT.glob("Part_*/*.ipynb")) + sorted(ROOT.glob("Appendix/*.ipynb"))
IDS = [str(p.relative_to(ROOT)) for p in NOTEBOOKS]
HEADINGS_IN_ORDER = ["**Learning objectives**", "**Prerequisites:**", "**Runtime:**", "## Parameters", "## 1. ",
                     "## Check", "## Summary", "## Try next"]


def cells(path):
    return nbformat.read(path, as_version=4).cells


def code_sources(path):
    return [c.source for c in cells(path) if c.cell_type == "code"]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_code_cells_parse(path):
    for source in code_sources(path):
        # IPython shell/magic lines are not Python; none should appear outside the bootstrap anyway.
        ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%"))))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_anatomy_headings_in_order(path):
    nb_cells = cells(path)
    first = nb_cells[0]
    number = path.name.split("_")[0]
    assert first.cell_type == "markdown" and re.match(rf"# {number} · \S", first.source), \
        f"the first cell must be the title '# {number} · Title'"
    text = "\n".join(c.source for c in nb_cells if c.cell_type == "markdown")
    positions = [text.find(h) for h in HEADINGS_IN_ORDER]
    missing = [h for h, p in zip(HEADINGS_IN_ORDER, positions) if p < 0]
    assert not missing, f"missing anatomy headings: {missing}"
    assert positions == sorted(positions), f"anatomy headings out of order: {HEADINGS_IN_ORDER}"


def bootstrap(path):
    return code_sources(path)[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_bootstrap_cell_is_identical_everywhere_and_skipped_by_nbval(path):
    assert bootstrap(path) == bootstrap(NOTEBOOKS[0]), "the Colab bootstrap cell must be the same in every notebook"
    assert bootstrap(path).startswith("# NBVAL_SKIP")
    for needed in ('"-c", "/tmp/colab-keep.txt"', '"--no-deps", "-r", f"{REPO_DIR}/requirements-colab-nodeps.txt"'):
        assert needed in bootstrap(path), f"the bootstrap must install with {needed}: Colab's torch/numpy/pillow stay"
    setup = code_sources(path)[1]
    assert "import cookbook as cb" in setup and "cb.show_versions(" in setup, "second code cell: setup + versions"
    assert setup.splitlines()[:6] == code_sources(NOTEBOOKS[0])[1].splitlines()[:6]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_installs_outside_the_bootstrap(path):
    for source in code_sources(path)[1:]:
        assert not re.search(r"^\s*[!%]\s*pip|pip install", source, flags=re.M), "install only in the bootstrap cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_check_cell_asserts(path):
    nb_cells = cells(path)
    check = next(i for i, c in enumerate(nb_cells) if c.cell_type == "markdown" and c.source.startswith("## Check"))
    after = [c.source for c in nb_cells[check + 1:] if c.cell_type == "code"]
    assert after and after[0].count("assert ") >= 3, "the check cell needs asserts on measured numbers"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_listed_in_its_part_readme(path):
    readme = (path.parent / "README.md").read_text()
    assert path.name in readme, f"{path.name} is not listed in {path.parent.name}/README.md"
    assert f"colab.research.google.com/github/" in readme


def pins(path):
    return dict(re.findall(r"^([A-Za-z0-9_.\[\]-]+)==(\S+)", path.read_text(), flags=re.M))


def test_colab_requirements_use_the_same_pins():
    main = {k.lower().replace("_", "-"): v for k, v in pins(ROOT / "requirements.txt").items()}
    colab = {k.lower().replace("_", "-"): v for k, v in pins(ROOT / "requirements-colab.txt").items()}
    colab.update({k.lower().replace("_", "-"): v for k, v in pins(ROOT / "requirements-colab-nodeps.txt").items()})
    assert colab, "requirements-colab.txt pins nothing"
    assert "torch" not in colab, "Colab keeps its own CUDA torch"
    assert {k: v for k, v in colab.items() if main.get(k) != v} == {}, "Colab pins must equal requirements.txt"


def test_main_requirements_are_exact_pins_and_exclude_cuda_only_packages():
    lines = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert all("==" in l for l in lines), [l for l in lines if "==" not in l]
    names = {l.split("==")[0].lower() for l in lines}
    assert not names & {"torchvision", "triton", "xformers", "torchaudio"}
    assert "torch==2.13.0" in lines


def test_every_part_folder_exists_with_a_readme():
    parts = ["Part_0_Introduction_and_Setup", "Part_1_Supervised_Finetuning_SFT", "Part_2_Preference_Alignment",
             "Part_3_Advanced_Finetuning_with_Axolotl", "Part_4_Quantization", "Part_5_Deployment_with_vLLM",
             "Part_6_Evaluation", "Part_7_Advanced_Architectures", "Appendix"]
    for part in parts:
        assert (ROOT / part / "README.md").exists(), part


def test_results_baselines_are_recorded():
    data = json.loads((ROOT / "results" / "cpu" / "00_Introduction_and_Setup.json").read_text())
    assert {e["task"] for e in data["entries"].values()} >= {"dates", "json_extraction", "arithmetic", "preference"}
