"""The series report (scripts/run_series.py), rendered from a small fixture of result files: no notebook runs."""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import cookbook as cb  # noqa: E402
import run_series  # noqa: E402


def test_report_tables_every_technique_names_the_failure_and_draws_the_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(cb, "RESULTS_DIR", tmp_path)
    monkeypatch.setenv(cb.PROFILE_ENV, "cpu")
    cb.record_result("01_SFT_with_TRL_and_LoRA", "LoRA SFT (TRL)", task="dates", trainable_params=4884480,
                     wall_s=199.6, tokens_per_s=127.7, score_before=0.11, score=0.89)
    cb.record_result("04_Aligning_with_DPO_using_TRL", "SFT -> DPO", task="preference", wall_s=480.0,
                     preference_rate=0.57, score=0.8)
    cb.record_result("09_Post_Training_Quantization_for_GGUF_llama_cpp", "Q4_K_M", task="dates", perplexity=16.466,
                     size_mb=100.6, score=0.82)
    outputs = tmp_path / "outputs"  # what a Trainer leaves: log history in each checkpoint's trainer_state.json
    for step in (10, 20):
        state = outputs / "01_SFT_with_TRL_and_LoRA" / f"checkpoint-{step}" / "trainer_state.json"
        state.parent.mkdir(parents=True)
        state.write_text(json.dumps({"log_history": [{"step": s, "loss": 2.0 / s} for s in range(1, step + 1)]
                                     + [{"step": step, "eval_loss": 0.5}]}))
    assert run_series.collect_losses("04_Aligning_with_DPO_using_TRL", outputs) is None
    curves = json.loads(run_series.collect_losses("01_SFT_with_TRL_and_LoRA", outputs).read_text())
    assert list(curves) == ["run"] and len(curves["run"]) == 20 and curves["run"][-1] == [20, 0.1]
    status = {"Part_1/01.ipynb": {"ok": True, "wall_s": 314.5, "error": ""},
              "Part_2/04.ipynb": {"ok": False, "wall_s": 12.0, "error": "cell 15: AssertionError: rate fell"}}

    report = run_series.write_report(status, tmp_path).read_text()

    assert "| [`Part_2/04.ipynb`](../Part_2/04.ipynb) | FAILED at cell 15: AssertionError: rate fell | 12 |" in report
    assert "**total** (2 notebooks, 1 failed) | | **326** |" in report
    header = next(line for line in report.splitlines() if line.startswith("| notebook | technique"))
    assert header.split(" | ")[2:] == ["task", "trainable params", "wall time (s)", "tokens/s", "score before",
                                       "held-out score", "preference rate", "perplexity", "size (MiB) |"]
    assert "| 01_SFT_with_TRL_and_LoRA | LoRA SFT (TRL) | dates | 4,884,480 | 199.6 | 127.7 | 0.11 | 0.89 |  |  |  |" in report
    assert "| 09_Post_Training_Quantization_for_GGUF_llama_cpp | Q4_K_M | dates |  |  |  |  | 0.82 |  | 16.47 | 100.6 |" in report
    for image in ("report_score_vs_time.png", "report_size_vs_perplexity.png", "report_loss_curves.png"):
        assert f"]({image})" in report and (tmp_path / image).stat().st_size > 1000
    html = (tmp_path / "REPORT.html").read_text()
    assert "<table>" in html and "FAILED at cell 15" in html and 'src="report_size_vs_perplexity.png"' in html


def test_report_without_results_lists_only_the_notebooks(tmp_path, monkeypatch):
    monkeypatch.setattr(cb, "RESULTS_DIR", tmp_path)
    monkeypatch.setenv(cb.PROFILE_ENV, "cpu")
    report = run_series.write_report({"Part_0/00.ipynb": {"ok": True, "wall_s": 88.7, "error": ""}}, tmp_path).read_text()
    assert "| [`Part_0/00.ipynb`](../Part_0/00.ipynb) | ok | 89 |" in report
    assert "Techniques side by side" not in report and not list(tmp_path.glob("*.png"))


def test_readme_figures_are_those_of_the_results():
    rows = cb.load_results(cb.PROFILES["cpu"])
    readme = (ROOT / "README.md").read_text()
    block = readme.split(run_series.README_BLOCK[0], 1)[1].split(run_series.README_BLOCK[1], 1)[0].strip()
    assert block == run_series.headline_table(rows), \
        "README's results table differs from results/cpu/: rewrite it with `make run ARGS=--report-only`"


def test_a_planted_wrong_figure_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(cb, "RESULTS_DIR", tmp_path)
    monkeypatch.setenv(cb.PROFILE_ENV, "cpu")
    cb.record_result("01_SFT_with_TRL_and_LoRA", "LoRA SFT (TRL)", task="dates", wall_s=199.6, score_before=0.11,
                     score=0.84)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{run_series.README_BLOCK[0]}\nold\n{run_series.README_BLOCK[1]}\nrest\n")
    assert run_series.render_readme(cb.load_results(), readme) and not run_series.render_readme(cb.load_results(), readme)
    assert "| 01 | LoRA SFT (TRL) | dates | score | 0.11 → 0.84 | 199.6 |" in readme.read_text()
    readme.write_text(readme.read_text().replace("0.84 |", "0.89 |"))   # planted: a figure typed by hand
    assert run_series.render_readme(cb.load_results(), readme), "a hand-edited figure must be rewritten"
