"""`python -m trainer` and `python -m launch run` as a new user meets them: --help, --cfg job and
config errors answer without importing torch, every config error is one line with exit 2 (a
close-match suggestion for a typo), and `launch run` builds the whole job before torchrun starts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_helpers import build_synthetic, child_env

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = REPO, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=child_env(), cwd=cwd,
                          timeout=timeout)


def _heavy_imports(*args: str) -> list[str]:
    """Top-level packages of torch & co. that ``python -X importtime <args>`` imported."""
    r = _run("-X", "importtime", *args)
    mods = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines() if line.startswith("import time:")}
    return sorted(mods & {"torch", "torchvision", "deepspeed", "mlflow", "matplotlib", "webdataset"})


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"], ["train.step=3"], ["task=nope"]])
def test_help_cfg_and_config_errors_import_no_torch(args):
    assert _heavy_imports("-m", "trainer", *args) == []


def test_help_names_tasks_overrides_and_docs():
    r = _run("-m", "trainer", "--help")
    assert r.returncode == 0, r.stderr
    for text in ("classification, depth, flow, segmentation", "train.steps=", "data.root=", "out_dir=",
                 "docs/engine.md", "exit codes", "130 Ctrl-C, 143 SIGTERM"):
        assert text in r.stdout, text
    assert "_schema" not in r.stdout  # Hydra's page listed the internal schema entries as choices


def test_cfg_job_prints_the_config_and_exits_0():
    r = _run("-m", "trainer", "--cfg", "job", "task=flow", "train.steps=7")
    assert r.returncode == 0, r.stderr
    assert "name: flow" in r.stdout and "steps: 7" in r.stdout
    assert "out_dir: outputs/flow-" in r.stdout  # a folder of its own (see test_default_out_dir_*)


@pytest.mark.parametrize("override,line", [
    ("train.step=3", "unknown key train.step; did you mean train.steps?"),
    ("+train.stepz=3", "unknown key train.stepz; did you mean train.steps?"),
    ("trian.steps=3", "unknown key trian.steps; did you mean train.steps?"),
    ("task.supervison=mono", "unknown key task.supervison; did you mean task.supervision?"),
    ("task=nope", "task=nope: no such task; choose one of classification, depth, flow, segmentation (configs/task/)"),
    ("parallel=dpp", "parallel=dpp: no such parallel; did you mean parallel=ddp? choose one of"),
    ("train.steps=abc", "train.steps=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    ("optim=adam", "optim=adam: optim is not a config group"),
    ("+experiment=demo", "configs/experiment/demo.yaml: unknown key study for the run config (RunConfig) (a study "
                         "preset: run it with python -m launch study +experiment=demo)"),
])
def test_config_error_is_one_line_exit_2(override, line):
    r = _run("-m", "trainer", override)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"[trainer] error: {line}"), r.stderr


def test_default_out_dir_is_one_per_command_and_stable():
    from trainer.compose import load_run_config

    a, ov = load_run_config(["task=depth", "train.steps=5"])
    b, _ = load_run_config(["train.steps=5", "task=depth"])  # same command, another order: same folder
    c, _ = load_run_config(["task=depth", "train.steps=6"])
    assert a.out_dir == b.out_dir and a.out_dir.startswith("outputs/depth-") and a.out_dir != c.out_dir
    assert ov == ["task=depth", "train.steps=5", f"out_dir={a.out_dir}"]  # what Hydra runs with
    assert load_run_config(["out_dir=/x/y"])[0].out_dir == "/x/y"  # given: kept as is
    # ranks under torchrun add hydra.output_subdir=null: the same folder as rank 0's
    assert load_run_config(["task=depth", "train.steps=5", "hydra.output_subdir=null"])[0].out_dir == a.out_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("cli") / "syn", "--width", "96", "--sequences", "train=2",
                           "val=1", "test=1", "--frames-per-sequence", "6")


@pytest.fixture(scope="module")
def flow_weights(tmp_path_factory) -> Path:
    """A flow pre-training's export (encoder + flow_decoder), as `python -m trainer task=flow` writes it."""
    from trainer.config import ModelConfig
    from trainer.tasks.flow import FlowConfig, FlowTask

    path = tmp_path_factory.mktemp("flow") / "weights.pt"
    torch.save(FlowTask(FlowConfig(), ModelConfig()).build_model().state_dict(), path)
    return path


def _common(tiny: Path, out: Path) -> list[str]:
    return [f"data.root={tiny}", f"out_dir={out}", "tracking=none", "train.steps=1", "train.batch_size=2"]


@pytest.mark.timeout(240)
def test_weights_of_another_task_is_one_line_exit_2(tiny, flow_weights, tmp_path):
    r = _run("-m", "trainer", "task=segmentation", "task.init=depth", f"task.weights={flow_weights}",
             *_common(tiny, tmp_path / "seg"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        f"[trainer] error: task.init=depth: {flow_weights} has no depth_decoder.* tensors, so it "
        "is not a depth pre-training export (prefixes: ['encoder', 'flow_decoder'])"], r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "seg" / "checkpoints").exists()


# bad settings that used to reach torchrun (issue 27.5), each named in one line before it starts
BAD_SETTINGS = [
    (["optim.name=adamz"], "optim.name='adamz': expected one of adamw, adam, sgd"),
    (["parallel=zero2", "parallel.precision=fp16"], "parallel.precision=fp16 is not supported with DeepSpeed"),
    (["parallel=zero2", "parallel.zero_stage=5"], "parallel.zero_stage=5: DeepSpeed needs a ZeRO stage of 1, 2 or 3"),
    (["parallel=single"], "parallel.strategy=single but WORLD_SIZE=2"),
    (["parallel.backend=nccl"], "parallel.backend=nccl needs CUDA GPUs"),
    (["parallel.precision=fp8"], "parallel.precision='fp8': expected one of fp32, bf16, fp16"),
    (["model.encoder=resnet99"], "task=depth: model.encoder='resnet99': known encoders are"),
    (["schedule.name=cos"], "schedule.name='cos': expected one of constant, cosine, poly, step"),
    (["optim.lr=-1"], "optim (name=adamw, lr=-1.0"),
    (["optim.grad_accum=0"], "optim.grad_accum=0: must be >= 1"),
    (["task.supervision=monoo"], "task=depth: task.supervision='monoo'"),
    (["data.tail_policy=bad"], "data.tail_policy='bad'"),
    (["data.on_corrupt=x"], "on_corrupt='x': must be 'raise' or 'skip'"),
    (["data.num_workers=-1"], "num_workers=-1 >= 0"),
    (["train.steps=0"], "schedule: warmup_steps=0 and train.steps=0"),
    (["train.batch_size=5"], "fewer than train.batch_size=5: no full step"),
]


@pytest.mark.timeout(300)
def test_launch_run_builds_the_whole_job_before_torchrun(tiny, flow_weights, tmp_path, capsys):
    """Each bad setting: one line, exit 2, and no torchrun command (it never starts)."""
    from launch.torchrun import main

    cases = BAD_SETTINGS + [(["task=segmentation", "task.init=depth", f"task.weights={flow_weights}"],
                             "has no depth_decoder.* tensors")]
    for i, (bad, expected) in enumerate(cases):
        base = [*_common(tiny, tmp_path / f"run{i}"), "parallel=ddp"]
        # overrides after the flags are fine (issue 30.8): argparse's intermixed parsing
        assert main(["--gpus-per-node", "2", *base, *bad]) == 2, bad
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and expected in err, (bad, err)
    assert main(["--gpus-per-node", "2", *_common(tiny, tmp_path / "ok"), "parallel=ddp", "--dry-run"]) == 0


@pytest.mark.timeout(240)
def test_launch_run_cli_refuses_a_bad_optimizer_before_torchrun(tiny, tmp_path):
    r = _run("-m", "launch", "run", "task=depth", "parallel=ddp", "--gpus-per-node", "2", "optim.name=adamz",
             *_common(tiny, tmp_path / "run"))
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.strip() == "error: optim.name='adamz': expected one of adamw, adam, sgd"


def test_a_wrong_data_root_says_what_is_there(tiny, tmp_path):
    from trainer.errors import ConfigError
    from trainer.preflight import check_job

    base = ["tracking=none", f"out_dir={tmp_path / 'r'}", "train.batch_size=2"]
    with pytest.raises(ConfigError, match=f"{tiny}/train is itself a split folder .* use that as the root "
                                          f"\\(data.root={tiny}\\)"):
        check_job([*base, f"data.root={tiny}/train"], world_size=1)
    with pytest.raises(ConfigError, match=r"data.val_split='valid': no split 'valid' in .* \(its splits: test, "
                                          r"train, val\)"):
        check_job([*base, f"data.root={tiny}", "data.val_split=valid"], world_size=1)


@pytest.mark.parametrize("task", ["task=depth task.supervision=mono", "task=depth task.supervision=stereo",
                                  "task=depth task.supervision=mono_stereo", "task=depth task.supervision=supervised",
                                  "task=flow", "task=classification", "task=segmentation"])
def test_every_task_and_depth_mode_passes_the_whole_job_check(tiny, tmp_path, task):
    """The launcher's check builds each model on the meta device: code that reads a value while
    building it (stereo's init_depth did) must not fail there for a good config."""
    from trainer.preflight import check_job

    check_job([*task.split(), *_common(tiny, tmp_path / "run")], world_size=1)
