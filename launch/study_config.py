"""The study schema: which pre-trainings, fine-tuning protocols, N-shot sizes, datasets and seeds.

A study lives in ``configs/experiment/<name>.yaml`` under a top-level ``study:`` key (with
``# @package _global_``) and is loaded with Hydra, so ``python -m launch study
+experiment=<name> study.seeds=[0,1,2]`` works as usual. :func:`load_study` composes it,
validates it against :class:`StudyConfig` (unknown keys and wrong types are errors naming the
key) and checks the cross-references (protocol/dataset names, init values).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

#: MLflow tag holding a study job's configuration fingerprint (written by launch.study, read by
#: launch.compare to count only runs of each job's current configuration)
CONFIG_TAG = "study_job_config"

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
#: Initialisations that need no pre-training run (segmentation's ``task.init`` values).
NO_RUN_INITS = ("random", "imagenet")


@dataclass
class PretrainingConfig:
    """One pre-training: a trainer run (``task`` set) or a ready initialisation (random / imagenet)."""

    init: str = "random"
    """Segmentation ``task.init`` value used when fine-tuning from it (depth, flow, classification, random, imagenet...)."""
    task: Optional[str] = None
    """Trainer task of the pre-training run (depth | flow | classification); None = no run (random, imagenet)."""
    overrides: list[str] = field(default_factory=list)
    """Hydra overrides of the pre-training run (after ``study.common``)."""
    finetune_overrides: list[str] = field(default_factory=list)
    """Extra overrides for every fine-tuning from this pre-training (e.g. model.imagenet_weights=...)."""
    nproc: int = 0
    """Processes for the pre-training run (0 = ``study.nproc_per_job``)."""
    weights_from: str = ""
    """Name of another pre-training whose run this row fine-tunes from (no run of its own; ``task``
    unset), e.g. the depth run once with init=depth (encoder) and once with init=depth_full."""


@dataclass
class CompareConfig:
    """What the comparison reads from each fine-tuning run."""

    miou: str = "miou"
    """Metric name of mIoU (the final evaluation's key, e.g. test/miou; a bare name matches any prefix)."""
    pixel_acc: str = "pixel_acc"
    """Metric name of pixel accuracy."""
    prefer_prefixes: list[str] = field(default_factory=lambda: ["test", "final", "eval", "val"])
    """When the name is bare, the first prefix found wins (test/miou before val/miou)."""
    baselines: list[str] = field(default_factory=lambda: ["imagenet", "random"])
    """Pre-trainings whose difference every row shows (when present in the study)."""
    headline: list[str] = field(default_factory=list)
    """``[row, baseline]``: the difference the headline sentence reports first (the study's question),
    in the first column; [] = the first row that is not a baseline against the first baseline."""


@dataclass
class StudyConfig:
    """A study grid; every field is used by ``launch.study`` / ``launch.compare``."""

    name: str = "study"
    """Study name: MLflow tag ``study`` and default output folder name."""
    out_dir: str = ""
    """Folder for every job's run folder and the comparison ('' = outputs/<name>)."""
    tracking_uri: Optional[str] = None
    """MLflow URI; None -> $MLFLOW_TRACKING_URI, else sqlite in <out_dir>/mlflow."""
    experiment: str = ""
    """MLflow experiment ('' = geoprime-<name>)."""
    weights_file: str = "weights.pt"
    """File a pre-training exports into its run folder (what fine-tuning loads)."""
    nproc_per_job: int = 1
    """Processes per job (> 1: torchrun --standalone --nproc_per_node=N)."""
    parallel_jobs: int = 1
    """Jobs run at once on this machine, each with its share of the cores (a fine-tuning waits for
    its pre-training). Only the intra-op thread count of each job changes (floating-point summation
    order), nothing the grid plans or fingerprints."""
    common: list[str] = field(default_factory=list)
    """Hydra overrides for every job."""
    pretrain_seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of each pre-training row's runs: one run per seed. With several, the fine-tuning seeds
    are nested in them (``seeds[i]`` fine-tunes from the run of ``pretrain_seeds[i % len]``; a
    multiple of their count is required) and the table's unit is the pre-training run."""
    pretrain_seed: Optional[int] = None
    """Older spelling of one pre-training seed: ``pretrain_seed: n`` = ``pretrain_seeds: [n]``."""
    pretrainings: dict[str, PretrainingConfig] = field(default_factory=dict)
    """Pre-trainings by name (rows of the table)."""
    finetune: list[str] = field(default_factory=list)
    """Hydra overrides for every fine-tuning (task=segmentation is implied)."""
    protocols: dict[str, list[str]] = field(default_factory=lambda: {"full": ["task.protocol=full"]})
    """Fine-tuning protocols by name -> their overrides (full | frozen | linear...)."""
    datasets: dict[str, list[str]] = field(default_factory=dict)
    """Fine-tuning datasets by name -> their overrides (data.root=..., data.name=...)."""
    shots: list[int] = field(default_factory=lambda: [0])
    """N-shot training-set sizes (0 = the whole training split)."""
    protocol_shots: dict[str, list[int]] = field(default_factory=dict)
    """Per protocol, N-shot sizes replacing ``shots`` (e.g. frozen: [0], full: [4]): columns chosen
    one by one instead of the whole protocol x shots product."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Fine-tuning seeds (also choose the N-shot subsets)."""
    compare: CompareConfig = field(default_factory=CompareConfig)
    """How the comparison reads the runs."""
    timeout_s: float = 0.0
    """Per-job wall-clock limit in seconds (0 = none); a job over it is killed and counted as failed."""


def validate(study: StudyConfig, source: str) -> StudyConfig:
    """Cross-field checks, each error naming the study file and the key."""
    def fail(msg: str):
        raise ValueError(f"{source}: {msg}")

    if not _NAME.match(study.name):
        fail(f"study.name={study.name!r} must be lowercase letters, digits, '-' or '_'")
    if not study.pretrainings:
        fail("study.pretrainings is empty")
    if not study.datasets:
        fail("study.datasets is empty")
    if not study.protocols:
        fail("study.protocols is empty")
    _check_seeds(study, fail)
    for group in ("pretrainings", "datasets", "protocols"):
        for name in getattr(study, group):
            if not _NAME.match(name):
                fail(f"study.{group}.{name}: names must be lowercase letters, digits, '-' or '_'")
    for name, pre in study.pretrainings.items():
        if pre.weights_from:
            _check_weights_from(study, name, pre, fail)
            continue
        if pre.task is None and pre.init not in NO_RUN_INITS:
            fail(f"study.pretrainings.{name}: init={pre.init!r} needs a pre-training run; set task "
                 f"(or use one of {NO_RUN_INITS})")
        if pre.task is not None and pre.init in NO_RUN_INITS:
            fail(f"study.pretrainings.{name}: task={pre.task!r} with init={pre.init!r} would ignore the run's weights")
        if pre.nproc < 0:
            fail(f"study.pretrainings.{name}.nproc={pre.nproc} must be >= 0")
    if any(s < 0 for s in study.shots):
        fail(f"study.shots={study.shots}: sizes must be >= 0 (0 = all)")
    for protocol, sizes in study.protocol_shots.items():
        if protocol not in study.protocols:
            fail(f"study.protocol_shots.{protocol}: no such protocol (study.protocols has {sorted(study.protocols)})")
        if not sizes or any(s < 0 for s in sizes):
            fail(f"study.protocol_shots.{protocol}={sizes}: needs sizes >= 0 (0 = all)")
    headline = study.compare.headline
    if headline and (len(headline) != 2 or any(h not in study.pretrainings for h in headline)):
        fail(f"study.compare.headline={headline}: give [row, baseline], two names of study.pretrainings "
             f"({', '.join(study.pretrainings)})")
    if study.nproc_per_job < 1:
        fail(f"study.nproc_per_job={study.nproc_per_job} must be >= 1")
    if study.parallel_jobs < 1:
        fail(f"study.parallel_jobs={study.parallel_jobs} must be >= 1")
    for o in [*study.common, *study.finetune]:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in ("out_dir", "seed", "task", "task.init", "task.weights"):
            fail(f"override {o!r}: {key} is set by the study for each job")
    return study


def _check_seeds(study: StudyConfig, fail) -> None:
    """Fine-tuning and pre-training seeds: non-empty, distinct, the former nested in the latter."""
    for key in ("seeds", "pretrain_seeds"):
        values = getattr(study, key)
        if not values:
            fail(f"study.{key} is empty")
        if len(set(values)) != len(values):
            fail(f"study.{key}={values}: repeated seed")
    n, p = len(study.seeds), len(study.pretrain_seeds)
    if p > 1 and n % p:
        fail(f"study.seeds={study.seeds}: {n} fine-tuning seeds cannot be split evenly over the {p} "
             f"pre-training runs of study.pretrain_seeds={study.pretrain_seeds}; give a multiple of {p}")


def _check_weights_from(study: StudyConfig, name: str, pre: PretrainingConfig, fail) -> None:
    """A ``weights_from`` row: names a pre-training that has a run, has no run of its own."""
    src = study.pretrainings.get(pre.weights_from)
    if src is None or src.task is None or src.weights_from:
        fail(f"study.pretrainings.{name}.weights_from={pre.weights_from!r} must name a pre-training with a run "
             f"(task set; known: {sorted(n for n, p in study.pretrainings.items() if p.task and not p.weights_from)})")
    if pre.task is not None:
        fail(f"study.pretrainings.{name}: weights_from={pre.weights_from!r} and task={pre.task!r} exclude each "
             f"other (a weights_from row has no run of its own)")
    if pre.init in NO_RUN_INITS:
        fail(f"study.pretrainings.{name}: weights_from with init={pre.init!r} would ignore the weights")


def load_study(overrides: list[str], config_dir: Path = CONFIG_DIR) -> StudyConfig:
    """Compose ``+experiment=<name>`` (and further overrides) with Hydra and validate the study."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    names = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("experiment=")]
    if not names:
        raise ValueError("no study given: pass +experiment=<name> (a file in configs/experiment/)")
    source = str(config_dir / "experiment" / f"{names[-1]}.yaml")
    if not Path(source).exists():
        known = sorted(p.stem for p in (config_dir / "experiment").glob("*.yaml"))
        raise FileNotFoundError(f"no study {names[-1]!r}: {source} does not exist (known: {', '.join(known)})")
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = compose(config_name=None, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ValueError(f"{source}: {e}") from e
    finally:
        GlobalHydra.instance().clear()
    if "study" not in cfg:
        raise ValueError(f"{source} is not a study (no top-level 'study:' key with '# @package _global_'); "
                         f"run trainer presets with: python -m trainer +experiment={names[-1]}")
    return from_dict(cfg.study, source)


def from_dict(raw, source: str = "<study>") -> StudyConfig:
    """Validate a plain dict / DictConfig against the schema and return the typed study."""
    try:
        raw = raw if isinstance(raw, DictConfig) else OmegaConf.create(raw)
        merged = OmegaConf.merge(OmegaConf.structured(StudyConfig), raw)
        if "protocols" in raw:  # a study's protocols replace the default one (a merge would keep "full")
            merged.protocols = raw.protocols
    except OmegaConfBaseException as e:
        raise ValueError(f"{source}: {e}") from e
    study: StudyConfig = OmegaConf.to_object(merged)
    if study.pretrain_seed is not None:
        if "pretrain_seeds" in raw:
            raise ValueError(f"{source}: study.pretrain_seed={study.pretrain_seed} and study.pretrain_seeds="
                             f"{study.pretrain_seeds} both set; keep pretrain_seeds (a list) only")
        study.pretrain_seeds = [study.pretrain_seed]
    if not study.out_dir:
        study.out_dir = f"outputs/{study.name}"
    if not study.experiment:
        study.experiment = f"geoprime-{study.name}"
    return validate(study, source)
