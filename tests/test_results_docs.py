"""Every number quoted in docs/results/README.md is in the results file its sentence cites.

A *unit* of the README is one table row, or one paragraph / bullet. The files a unit cites are the
results files it links (``[x.md](x.md)``: x.md's text and the values of x.json beside it; a
``.txt`` log: its text). A unit that links none is read against the files of the nearest unit
above it in the same section that does (a table against the sentence that introduces it).

A quoted number matches a value of a cited ``.json`` (any number in it, and the median of every
list of numbers, as the benchmark tables print medians) when it equals the value rounded to the
digits printed, also after a change of unit (s <-> ms, counts in thousands or millions, MiB <->
GiB, s -> min); a number printed in a cited ``.md`` / ``.txt`` counts as such a value (so 19.99
printed may be quoted as 20.0; a hand-added section of an .md, such as cd-digits.md's other
samplers, is held to what it prints).

Not results, so not checked (the explicit exclusion rule):
1. text in backticks (commands, flags, commits, names) and headings;
2. dates and dotted versions (2026-11-26, 2.11.0);
3. a number glued to a letter, an underscore or a leading hyphen (rk3, H200, 50k, CIFAR-10);
4. integers below 20: NFE counts, steps, rounds, threads, network passes, stage numbers;
5. percentages (a number followed by %): they compare numbers the same sentence quotes;
6. the few numbers derived in the text from quoted ones, listed in DERIVED with their derivation.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"

LINK = re.compile(r"\]\(([\w.\-]+\.(?:md|json|txt|png))\)")
CODE = re.compile(r"`[^`]*`")
DATE_OR_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(?:T[\d:+]+)?|\d+\.\d+\.\d+(?:\.\d+)*")
NUMBER = re.compile(r"(?<![\w\-.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\w|\.\d|,\d)(\s*%)?")
SCALES = (1.0, 1e3, 1e-3, 1e-6, 2.0 ** -10, 1 / 60)

# Numbers the README derives from quoted ones (not stored in any file), with the derivation.
DERIVED = {
    "58": "sampling-h200: 3,000 / 3,092 - 3,000 / 3,291 images/s = 0.058 s",
    "823": "sampling-h200: the NFE-1 raw forward 3,291 images/s / 4",
    "25": "overhead-cpu: 128 images / fm's 5,045 images/s = 25 ms a step",
    "50": "the paper's MNIST budget 12.8 M images (50k x 256, recipes/cud-mnist.toml) / 256,000",
    "12.8": "50k iterations x 256 images, the paper's MNIST recipe (recipes/cud-mnist.toml)",
}


def units(text: str) -> list[tuple[str, list[str]]]:
    """(unit text, the files it cites) for every table row, paragraph and bullet."""
    found: list[tuple[str, list[str]]] = []
    current: list[str] = []
    section_links: list[str] = []

    def close() -> None:
        nonlocal section_links
        if current:
            body = "\n".join(current)
            links = LINK.findall(body)
            section_links = links or section_links
            found.append((body, links or section_links))
            current.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            close()
            section_links = []
        elif not stripped or stripped.startswith("|---"):
            close()
        elif stripped.startswith("|") or stripped.startswith("- "):
            close()
            current.append(stripped)
            if stripped.startswith("|"):
                close()
        else:
            current.append(stripped)
    close()
    return found


def quoted_numbers(unit: str) -> list[str]:
    """The numbers of ``unit`` that are results (see the module docstring for what is excluded)."""
    text = DATE_OR_VERSION.sub(" ", CODE.sub(" ", LINK.sub("]", unit)))
    numbers = []
    for match in NUMBER.finditer(text):
        whole, decimals, percent = match.group(1), match.group(2) or "", match.group(3)
        if percent or (not decimals and int(whole.replace(",", "")) < 20):
            continue
        numbers.append(whole + decimals)
    return numbers


def json_values(data) -> list[float]:
    """Every number in a JSON document, and the median of every list of numbers."""
    values: list[float] = []
    if isinstance(data, dict):
        for item in data.values():
            values += json_values(item)
    elif isinstance(data, list):
        numbers = [x for x in data if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if numbers:
            values.append(statistics.median(numbers))
        for item in data:
            values += json_values(item)
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        values.append(float(data))
    return values


def printed_numbers(text: str) -> list[float]:
    return [float(m.group(1).replace(",", "") + (m.group(2) or "")) for m in NUMBER.finditer(text)]


def sources(links: list[str], folder: Path) -> list[float]:
    values: list[float] = []
    for link in links:
        path = folder / link
        if path.suffix in (".md", ".txt"):
            values += printed_numbers(path.read_text())
        data = path.with_suffix(".json")
        if data.exists():
            values += json_values(json.loads(data.read_text()))
    return values


def matches(number: str, values: list[float]) -> bool:
    plain = number.replace(",", "")
    quoted = float(plain)
    digits = len(plain.split(".")[1]) if "." in plain else 0
    half = 0.5 * 10.0 ** -digits + 1e-9
    return any(abs(v * scale - quoted) <= half for v in values for scale in SCALES)


def unsourced(readme: str, folder: Path) -> list[str]:
    """'number: unit excerpt (cited files)' for every quoted number no cited file holds."""
    problems = []
    for body, links in units(readme):
        numbers = [n for n in quoted_numbers(body) if n.replace(",", "") not in DERIVED]
        if not numbers:
            continue
        if not links:
            problems.append(f"{numbers}: cites no results file: {body[:100]!r}")
            continue
        values = sources(links, folder)
        for number in numbers:
            if not matches(number, values):
                problems.append(f"{number}: not in {links}: {body[:100]!r}")
    return problems


def test_every_number_in_the_results_readme_is_in_the_file_it_cites():
    problems = unsourced((RESULTS / "README.md").read_text(), RESULTS)
    assert not problems, "\n".join(problems)


def test_every_link_of_the_results_readme_exists():
    missing = [link for _, links in units((RESULTS / "README.md").read_text()) for link in links
               if not (RESULTS / link).exists()]
    assert not missing


@pytest.fixture
def results(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"rows": {"fm": {"images_per_second": 881.59, "seconds": 0.01408},
                                                            "rounds": [3087.2, 3096.1]}}))
    (tmp_path / "run.md").write_text("| fm | 882 |\n")
    return tmp_path


def test_the_check_accepts_rounded_values_medians_and_units(results):
    readme = ("# Results\n\nfm ran 881.6 images/s (882 as printed, 3,092 the median, 14 ms a step) "
              "on 2026-11-26 with `--steps 150`, NFE 4, rk3, 12 % faster; see [run.md](run.md).\n\n"
              "| fm | 881.59 |\n")
    assert unsourced(readme, results) == []


def test_the_check_fails_on_a_number_the_file_does_not_hold(results):
    readme = "# Results\n\nfm ran 901.6 images/s, see [run.md](run.md).\n\n| fm | 0.921 |\n"
    problems = unsourced(readme, results)
    assert [p.split(":")[0] for p in problems] == ["901.6", "0.921"]


def test_the_check_fails_on_numbers_without_a_cited_file(results):
    assert unsourced("# Results\n\nfm ran 881.6 images/s.\n", results)


# --------------------------------------------------------------------------------------------
# plan-real-scale.md: the derived GPU-hours are what the recipes and method-cost-h200.json give

ROOT = RESULTS.parent.parent
HOURS_ROW = re.compile(r"^\| `([\w\-]+\.toml)[^`]*`[^|]*\| (cud[\w\-]*) \| [^|]* \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$")


def plan_cost_rows(text: str) -> list[tuple[str, str, str, str, str]]:
    return [m.groups() for m in map(HOURS_ROW.match, text.splitlines()) if m]


def expected_hours(recipe: str, label: str, cost: dict) -> tuple[float, float]:
    """(seconds per step, hours on one GPU): steps x s/step x (recipe batch / measured batch)."""
    import statistics as stats
    import tomllib

    train = tomllib.loads((ROOT / "recipes" / recipe).read_text())["train"]
    seconds = stats.median(run["seconds_per_step"] for run in cost["rows"][label]["runs"])
    per_image_scale = train["batch_size"] / 128  # method-cost-h200 measured batch 128
    return seconds, train["max_steps"] * seconds * per_image_scale / 3600


def close_to_printed(printed: str, value: float) -> bool:
    digits = len(printed.split(".")[1]) if "." in printed else 0
    return abs(float(printed) - value) <= 0.5 * 10.0 ** -digits + 1e-9


def test_the_plans_gpu_hours_follow_from_the_recipes_and_the_measured_cost():
    cost = json.loads((RESULTS / "method-cost-h200.json").read_text())
    assert cost["args"]["preset"] == "cifar10" and "batch 128" in (RESULTS / "method-cost-h200.md").read_text()
    rows = plan_cost_rows((RESULTS / "plan-real-scale.md").read_text())
    assert {row[1] for row in rows} == {"cud-euler", "cud-rk2", "cud-rk3", "cud-stage2"}
    for recipe, label, seconds, one_gpu, eight_gpus in rows:
        measured, hours = expected_hours(recipe, label, cost)
        assert close_to_printed(seconds, measured), (recipe, label, seconds, measured)
        assert close_to_printed(one_gpu, hours), (recipe, label, one_gpu, hours)
        assert close_to_printed(eight_gpus, hours / 8), (recipe, label, eight_gpus, hours / 8)


def test_the_plans_measured_vs_paper_table_is_empty_until_runs_exist():
    text = (RESULTS / "plan-real-scale.md").read_text()
    table = text[text.index("## FID measured vs paper"):]
    rows = [line for line in table.splitlines() if line.startswith("|") and not line.startswith("|---")]
    assert rows[0].startswith("| recipe | NFE |") and len(rows) == 1, "a row needs its run and results file"
