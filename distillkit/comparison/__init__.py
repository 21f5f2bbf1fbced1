"""Comparing methods at an equal training budget: the plan, the MLflow parent / child runs, and
what is logged to the parent (a markdown table, a CSV, a quality-vs-NFE plot, a JSON summary).

``run_comparison(ComparisonRequest(...))`` does it all: one child run per method (x integrator
for methods whose training uses one) under one parent run, each trained for
``ceil(budget_images / batch_size)`` steps, evaluated with the same protocol, reused on a later
call when a finished child of identical configuration already exists under the same parent.
``distillkit compare`` (``cli/compare.py``) only turns its flags into the request and prints the
result.

| module | holds |
|---|---|
| ``plan`` | the request, variants, child config trees, identities, ``plan_comparison`` |
| ``children`` | teachers, training a child under the parent, MLflow lookups, measuring a child |
| ``report`` | ``Row`` and what the parent gets: table, CSV, plot, JSON, tags |
| ``runner`` | ``run_comparison``: from the request to the logged report |
"""

from .children import (CHILD_TAG, PARENT_TAG, evaluate_child, find_child, find_parent, load_teachers,
                       plugin_distribution, prepare_metrics, train_child)
from .plan import (Child, ComparisonRequest, Override, Plan, Variant, child_identity, child_tree, parent_identity,
                   plan_comparison, steps_for_budget, variants)
from .report import (ARTIFACTS, Row, child_row, csv_rows, log_report, markdown_table, note, summary_json,
                     write_csv, write_plot)
from .runner import ComparisonResult, run_comparison

__all__ = [
    "ARTIFACTS", "CHILD_TAG", "PARENT_TAG", "Child", "ComparisonRequest", "ComparisonResult", "Override", "Plan",
    "Row", "Variant", "child_identity", "child_row", "child_tree", "csv_rows", "evaluate_child", "find_child",
    "find_parent", "load_teachers", "log_report", "markdown_table", "note", "parent_identity", "plan_comparison",
    "plugin_distribution", "prepare_metrics", "run_comparison", "steps_for_budget", "summary_json", "train_child",
    "variants", "write_csv", "write_plot",
]
