"""The comparison's notes say which model each row scores and what each row was initialised from
(issue 32, items 5 and 7), from the tags the runs carry."""
from __future__ import annotations

from launch.provenance import checkpoint_note, notes, provenance_notes
from launch.runstore import RunRecord
from launch.study_config import CompareConfig


def _run(row, prov=None):
    tags = {"grid_pretraining": row, **({"init.provenance": prov} if prov else {})}
    return RunRecord(run_id=f"r-{row}-{prov}", name=row, status="FINISHED", tags=tags)


def test_rows_list_their_initialisations():
    runs = [_run("depth", "weights file /o/pre-depth-s0/weights.pt (sha256 ab; run 1, step 500)"),
            _run("depth", "weights file /o/pre-depth-s1/weights.pt (sha256 cd; run 2, step 500)"),
            _run("depth", "weights file /o/pre-depth-s0/weights.pt (sha256 ab; run 1, step 500)"),
            _run("monodepth2", "Monodepth2 release /w/mono_640x192 (trained at 640x192, use_stereo=False; ...)"),
            _run("random", "random initialisation (seed 3)"), _run("old")]
    lines = provenance_notes(runs, ["depth", "monodepth2", "random", "old"])
    assert lines[0] == ("- depth: weights file /o/pre-depth-s0/weights.pt (sha256 ab; run 1, step 500); "
                        "weights file /o/pre-depth-s1/weights.pt (sha256 cd; run 2, step 500)")
    assert lines[1].startswith("- monodepth2: Monodepth2 release /w/mono_640x192") and lines[2].endswith("(seed 3)")
    assert "no `init.provenance` tag" in lines[3]


def test_the_note_says_which_model_is_scored():
    assert checkpoint_note(CompareConfig()).startswith("Scores: each fine-tuning's final model (`test/*`)")
    best = CompareConfig(miou="test_best/miou_subset", pixel_acc="test_best/pixel_acc")
    assert checkpoint_note(best).startswith("Scores: each fine-tuning's best-on-validation checkpoint")
    assert "Initialisation of each row" in notes([_run("random", "random initialisation (seed 0)")], ["random"],
                                                 CompareConfig())
