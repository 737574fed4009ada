"""What a study's MLflow experiments and parent run say about themselves (MLflow descriptions, Markdown).

A study writes into two experiments: ``<experiment>`` holds the study's parent run with one child
run per fine-tuning (the transfer grid: every run has the same metric names, so MLflow's table,
"show differences only" and charts compare like with like), and ``<experiment>-pretraining`` holds
the pre-trainings (different tasks, different metrics). :func:`describe_study` writes the
descriptions that say how to read them; :func:`note_with_comparison` puts the latest comparison
table under the parent run's description. :data:`HELP_EPILOG` ends ``python -m launch study --help``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields

from launch.runstore import TrackingStore, pretraining_experiment
from launch.study_config import CompareConfig, StudyConfig

#: The end of ``python -m launch study --help``: the command-line rules users trip over, and examples.
HELP_EPILOG = """\
Flags go before the Hydra overrides. --only takes several job ids: end them with `--`, else the
overrides after it are read as job ids too.
  python -m launch study --dry-run +experiment=demo
  python -m launch study --verbose --only pre-depth_stereo_full-p0 ft-random-synthetic-frozen-nall-p0-s0 -- +experiment=demo

Quote overrides with [ ] { } or spaces for the shell; a list element that contains `=` needs its
own double quotes inside the single ones (Hydra refuses [train.steps=20]). A list override
replaces the whole list: repeat the entries you keep (--dry-run shows what each job gets).

Common changes (study fields: launch/study_config.py; the demo: configs/experiment/demo.yaml):
  fewer steps      'study.finetune=["train.steps=20","train.batch_size=8","optim.lr=1e-3"]'
                   'study.pretrainings.depth_stereo_full.overrides=["task.supervision=stereo","train.steps=50"]'
  other data root  'study.common=["data.root=/data/shards","data.num_workers=2","model.encoder=resnet18"]'
  more seeds       'study.seeds=[0,1,2,3,4,5,6,7]' (two fine-tunings per pre-training run) or
                   'study.pretrain_seeds=[0,1,2,3,4]' 'study.seeds=[0,1,2,3,4]' (one more run per row)
  one run per row  'study.pretrain_seeds=[0]' (cheaper; the intervals then cover fine-tuning noise only)
  part of the grid 'study.seeds=[0]' 'study.shots=[0]', or --only <job id ...> -- (ids: --dry-run)
  MLflow server    study.tracking_uri=http://127.0.0.1:5000
Re-running the same command skips finished jobs and resumes interrupted ones.
"""


#: The heading under which the parent run's description carries the latest comparison.
COMPARISON_HEADING = "## Latest comparison"
#: How the first paragraph of a study's transfer-experiment description starts once compared.
HEADLINE_MARKER = "**Result**: "
#: Parent-run tag with how the study is compared (``launch compare --study`` reads it, having no config).
COMPARE_TAG = "study_compare"
#: MLflow keeps at most this many characters in a run tag (the run description is one).
MAX_RUN_NOTE = 8000


def _grid(study: StudyConfig) -> str:
    shots = ", ".join("all" if s == 0 else str(s) for s in study.shots)
    pseeds = ", ".join(map(str, study.pretrain_seeds))
    nesting = (f" (nested in pre-training seed `grid_pretrain_seed`: {pseeds}, one pre-training run each)"
               if len(study.pretrain_seeds) > 1 else f" (one pre-training run per row, seed {pseeds})")
    return (f"pre-training `grid_pretraining` ({', '.join(study.pretrainings)}) × dataset `grid_dataset` "
            f"({', '.join(study.datasets)}) × protocol `grid_protocol` ({', '.join(study.protocols)}) × "
            f"N-shot `grid_shots` ({shots}; 0 = all) × seed `grid_seed` ({', '.join(map(str, study.seeds))})"
            f"{nesting}")


def scored_metrics(compare) -> str:
    """Which logged metrics the table scores, in words: ``test/miou_subset`` (in % as ``score/...``)."""
    return (f"`{_logged_name(compare.miou)}` and `{_logged_name(compare.pixel_acc)}` (in % as the table shows them: "
            f"`score/miou_percent`, `score/pixel_acc_percent`)")


def _logged_name(name: str) -> str:
    return name if "/" in name else f"test/{name}"


def transfer_note(study: StudyConfig) -> str:
    """Description of the study's transfer experiment (the fine-tuning grid)."""
    other = "" if study.compare.miou in ("miou", "test/miou") else (
        f" (`test/miou` averages every class present in prediction or ground truth; the study scores "
        f"`{_logged_name(study.compare.miou)}`: `test/miou_classes` and `test/miou_subset_classes` count the "
        f"classes each averages, `test/pred_outside_subset` the pixels predicted as a class outside the subset)")
    return f"""geoprime study `{study.name}`: segmentation after each pre-training (the transfer grid).

- **Open the study's view** (*Views* above the table): the scored metrics per run, grouped by pre-training
  (group rows show the mean), best first, with bar charts. Grid: {_grid(study)}.
- **Scored**: {scored_metrics(study.compare)}{other}; per class `test/iou/<class>`. The study run
  `study-{study.name}` (its description and artifacts `comparison/`) holds the table with the paired
  95 % intervals the verdicts use; its children are the fine-tunings (▸ next to its name).
- **Params** are the settings (only they differ between rows); paths and tracking set-up are tags
  `config.*`. **Datasets**: the shard manifests read, with digests. Pictures: artifacts `qualitative/`.
- Pre-trainings are in the experiment `{pretraining_experiment(study.experiment)}`.
"""


def with_headline(note: str, headline: str, link: str) -> str:
    """An experiment description whose first paragraph is ``headline`` and a link to the study's view
    (replacing an earlier such paragraph); the rest of ``note`` kept."""
    rest = note.split("\n\n", 1)[1] if note.startswith(HEADLINE_MARKER) and "\n\n" in note else note
    return f"{HEADLINE_MARKER}{headline} [Open the study view]({link}).\n\n{rest}"


def _keep_headline(old: str, new: str) -> str:
    """``new`` with ``old``'s headline paragraph in front, when ``old`` had one."""
    return old.split("\n\n", 1)[0] + "\n\n" + new if old.startswith(HEADLINE_MARKER) else new


def pretraining_note(study: StudyConfig) -> str:
    """Description of the study's pre-training experiment."""
    rows = ", ".join(f"`{name}` (task={pre.task})" for name, pre in study.pretrainings.items() if pre.task)
    return f"""geoprime study `{study.name}`: the pre-trainings ({rows or 'none'}).

Each run exports the weights that start the fine-tunings in the experiment `{study.experiment}` (tag
`grid_pretraining` names the row of the comparison, `grid_pretrain_seed` the run's seed). Metrics differ
by task (depth: `test/abs_rel`, ...; flow: `test/epe`, ...; classification: `val/map`, ...); beside each,
`<split>/baseline_<metric>` is the same metric of a trivial predictor (constant depth median-scaled, zero
flow, class frequencies): a pre-training that has learned its task beats it clearly. The comparison's
notes list both per row. Artifacts `qualitative/` hold labelled pictures (depth colour maps: input,
prediction, ground truth) when the run has an evaluation split to draw from.
"""


def parent_note(study: StudyConfig) -> str:
    """Description of the study's parent run."""
    return f"""geoprime study `{study.name}`: one child run per fine-tuning; grid: {_grid(study)}.

Read the comparison below (or artifacts `comparison/comparison.md`, `.csv`, `.png`): scored
{scored_metrics(study.compare)}; cells are mean ± std over {_unit(study)}; Δ is the paired difference to a
baseline ({', '.join(study.compare.baselines)}) with its 95 % interval, called better / worse only when that
interval excludes 0. Re-running the same command skips finished jobs and resumes interrupted ones.
"""


def _unit(study: StudyConfig) -> str:
    """What one replicate of the table's intervals is, for this study's seeds."""
    if len(study.pretrain_seeds) > 1:
        return f"pre-training runs ({len(study.pretrain_seeds)} per row; the intervals cover pre-training variance)"
    return "fine-tuning seeds (one pre-training run per row: the intervals cover fine-tuning noise only)"


def compare_settings(tags: dict[str, str]) -> tuple[CompareConfig, list[str], int] | None:
    """(compare config, row order, fine-tuning seeds) from a parent run's :data:`COMPARE_TAG`; None when
    it has none (or an unreadable one)."""
    try:
        raw = json.loads(tags[COMPARE_TAG])
        known = {f.name for f in fields(CompareConfig)}
        return (CompareConfig(**{k: v for k, v in raw["compare"].items() if k in known}), list(raw["rows"]),
                int(raw["seeds"]))
    except (KeyError, TypeError, ValueError):
        return None


def describe_study(store: TrackingStore, study: StudyConfig, parent_run_id: str) -> None:
    """Write the descriptions of the study's experiments and of its parent run (keeping a comparison
    already under the parent's description)."""
    old_note = store.experiment_note(study.experiment)
    store.set_experiment_note(study.experiment, _keep_headline(old_note, transfer_note(study)))
    if any(pre.task for pre in study.pretrainings.values()):
        store.set_experiment_note(pretraining_experiment(study.experiment), pretraining_note(study))
    old = store.run_note(parent_run_id)
    tail = old[old.index(COMPARISON_HEADING):] if COMPARISON_HEADING in old else ""
    store.set_run_note(parent_run_id, _fit(_keep_headline(old, parent_note(study) + ("\n" + tail if tail else ""))))
    store.set_tags(parent_run_id, {COMPARE_TAG: json.dumps({"compare": asdict(study.compare),
                                                            "rows": list(study.pretrainings),
                                                            "seeds": len(study.seeds)})})


def note_with_comparison(store: TrackingStore, parent_run_id: str, comparison_md: str, headline: str = "") -> None:
    """Put ``headline`` first and ``comparison_md`` under the parent run's description, replacing an
    older comparison (and its headline)."""
    old = store.run_note(parent_run_id)
    head = old.split(COMPARISON_HEADING)[0].rstrip()
    if head.startswith(HEADLINE_MARKER):
        head = head.split("\n\n", 1)[1] if "\n\n" in head else ""
    body = comparison_md.split("\n", 1)[1] if comparison_md.startswith("# ") else comparison_md
    top = f"{HEADLINE_MARKER}{headline}\n\n" if headline else ""
    store.set_run_note(parent_run_id, _fit(f"{top}{head}\n\n{COMPARISON_HEADING}\n{body}"))


def _fit(text: str) -> str:
    if len(text) <= MAX_RUN_NOTE:
        return text
    cut = "\n\n… (cut here: the whole table is in the artifacts `comparison/comparison.md`)\n"
    return text[:MAX_RUN_NOTE - len(cut)] + cut
