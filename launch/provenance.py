"""The comparison table's notes on what each row starts from and which model it scores.

Every training run tags where its initial weights came from (``init.provenance``: the file and
its sha256 with the run that wrote it, a Monodepth2 release, torchvision's ImageNet weights, or a
random initialisation and its seed; ``Task.provenance``). A fine-tuning that selects a
best-on-validation checkpoint logs its test metrics as ``test_best/*`` beside the final model's
``test/*``; the table scores the metric names in ``study.compare`` and says which that is.
"""
from __future__ import annotations

from launch.runstore import RunRecord
from launch.study_config import CompareConfig

#: Tag a run's task sets with its initialisation's provenance (trainer/tasks/*.py ``provenance``).
PROVENANCE_TAG = "init.provenance"
#: Provenance lines listed per row before "and N more".
MAX_PER_ROW = 3


def checkpoint_note(compare: CompareConfig) -> str:
    """One sentence: the final model or the best-on-validation checkpoint, by the metric names read."""
    names = [compare.miou, compare.pixel_acc]
    if any(n.startswith("test_best") for n in names):
        return ("Scores: each fine-tuning's best-on-validation checkpoint (`test_best/*`), selected on its "
                "validation split (optimistic where that is the split reported).")
    return ("Scores: each fine-tuning's final model (`test/*`); a run that also kept a best-on-validation "
            "checkpoint (`train.select_metric`) reports it as `test_best/*` in MLflow.")


def provenance_notes(runs: list[RunRecord], rows: list[str]) -> list[str]:
    """Markdown lines: per row, the distinct initialisations its runs started from."""
    found: dict[str, list[str]] = {}
    for run in runs:
        row, prov = run.tags.get("grid_pretraining"), run.tags.get(PROVENANCE_TAG)
        if row in rows and prov and prov not in found.setdefault(row, []):
            found[row].append(prov)
    lines = []
    for row in rows:
        provs = found.get(row)
        if not provs:
            lines.append(f"- {row}: no `{PROVENANCE_TAG}` tag on its runs (made before provenance was recorded)")
            continue
        more = f" (and {len(provs) - MAX_PER_ROW} more)" if len(provs) > MAX_PER_ROW else ""
        lines.append(f"- {row}: " + "; ".join(sorted(provs)[:MAX_PER_ROW]) + more)
    return lines


def notes(runs: list[RunRecord], rows: list[str], compare: CompareConfig) -> str:
    """The notes section under the table (Markdown)."""
    return ("\n" + checkpoint_note(compare) + "\n\nInitialisation of each row (tag `init.provenance`):\n"
            + "\n".join(provenance_notes(runs, rows)) + "\n")
