"""CI's time is the series' scarcest resource: every notebook has a budget in README.md, and the timings that the
last test run recorded (results/timings.json, written by conftest.py) must stay inside it.

The budgets are set for the slowest CPU seen on the CI machine kind (a 2-core AMD EPYC without AVX-512); a
faster machine's record is held to the same budget. A notebook that outgrows its budget fails here, by name, with
the command that re-measures it; budgets that no longer fit CI's hard limit fail too. The series' own target
(60 minutes with setup, 20 of them kept for planned notebooks: the reserve row) is tracked in the README.
"""
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(ROOT.glob("Part_*/*.ipynb")) + sorted(ROOT.glob("Appendix/*.ipynb"))
CI_LIMIT_S = 90 * 60


def budget_table(readme: str) -> tuple[dict[str, float], float, float]:
    """({notebook stem: budget s}, setup budget s, reserve s) from the README's time-budget section."""
    section = readme.split("<!-- time-budget:start -->", 1)[1].split("<!-- time-budget:end -->", 1)[0]
    budgets, setup, reserve = {}, None, None
    for name, seconds in re.findall(r"^\| `?([^|`]+?)`? \| (\d+) \|", section, flags=re.M):
        if name == "setup (cold)":
            setup = float(seconds)
        elif name == "reserve for planned notebooks":
            reserve = float(seconds)
        else:
            budgets[name] = float(seconds)
    assert setup is not None and reserve is not None, "the budget table needs its setup and reserve rows"
    return budgets, setup, reserve


def test_budget_table_parses_notebooks_setup_and_reserve():
    readme = ("<!-- time-budget:start -->\n| notebook | budget (s) |\n|---|---:|\n| `00_Intro` | 90 |\n"
              "| setup (cold) | 600 |\n| reserve for planned notebooks | 1200 |\n<!-- time-budget:end -->")
    assert budget_table(readme) == ({"00_Intro": 90.0}, 600.0, 1200.0)


def test_every_notebook_has_a_budget():
    budgets, _, _ = budget_table((ROOT / "README.md").read_text())
    stems = {p.stem for p in NOTEBOOKS}
    assert stems == set(budgets), f"budget rows without a notebook: {set(budgets) - stems}; " \
                                  f"notebooks without a budget: {stems - set(budgets)}"


@pytest.mark.xfail(strict=True, reason="known (issue 24): on the AVX2-only AMD EPYC the budgets exceed CI's 90 minutes; "
                                       "remove this mark once they fit")
def test_the_budgets_fit_ci():
    budgets, setup, _ = budget_table((ROOT / "README.md").read_text())
    total = sum(budgets.values()) + setup
    assert total <= CI_LIMIT_S, f"the budgets with setup ({total:.0f} s) exceed CI's hard limit of {CI_LIMIT_S} s"


def test_recorded_timings_stay_inside_their_budgets():
    budgets, _, _ = budget_table((ROOT / "README.md").read_text())
    timings = json.loads((ROOT / "results" / "timings.json").read_text())
    over = []
    for path, record in sorted(timings.items()):
        stem = pathlib.Path(path).stem
        if stem in budgets and record["wall_s"] > budgets[stem]:
            over.append(f"{path}: {record['wall_s']:.0f} s > budget {budgets[stem]:.0f} s "
                        f"(measured {record['measured_at']} on {record['machine']}; "
                        f"re-measure with: make test ARGS={path})")
    assert not over, "notebooks over their time budget:\n" + "\n".join(over)
