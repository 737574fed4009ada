"""Every command the README and docs/ show works as written (issue 30.7: none drifts again).

Commands are collected from fenced code blocks, indented code lines and inline code with
arguments. Each is checked by what it is: trainer commands (also under torchrun or an
environment prefix) are composed and checked as the trainer would (engine settings for
torchrun's world size included); ``launch run`` runs with ``--dry-run`` (``--sbatch`` for real),
``launch k8s`` and ``study --emit k8s`` render manifests that are validated against the
Kubernetes schemas, ``data_shards inspect / verify`` run on tiny shards, ``docker run`` lines go
through the image's entry point in a stand-in ``/workspace`` (one of them trains a step), and
commands that need real data, a GPU or hours are parsed by their own argparse parser (stopped
right after parsing), so a renamed option fails here. A command of a kind this file does not
know fails :func:`test_every_documented_command_has_a_check`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pytest
import yaml

from dist_helpers import child_env

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY = ["--height", "64", "--width", "96", "--sequences", "train=2", "val=1", "test=1", "--frames-per-sequence", "6",
        "--workers", "1", "--no-progress"]
TINY_RUN = ["train.steps=1", "train.batch_size=2", "tracking=none", "train.progress=false",
            "task.photometric_impl=handwritten"]
#: values for the docs' placeholders (a new placeholder needs a value here)
PLACEHOLDERS = {"<split>": "train", "<run>": "outputs/run", "<spool>": "spool.jsonl", "<name>": "demo",
                "<pre-training>": "depth", "<mlflow experiment>": "geoprime", "<study tag>": "demo", "<out_dir>": "outputs/depth-0123abcd"}
#: the docs' capitalised stand-ins where a number is parsed (RAW, SHARDS, FILE... stay paths)
NUMBERS = {"H": "64", "W": "64", "N": "4"}
#: commands the docs show failing on purpose, and the line they print
EXPECTED_ERRORS = {
    "python -m trainer train.step=3": "[trainer] error: unknown key train.step; did you mean train.steps?",
    "python -m trainer task=nope": "[trainer] error: task=nope: no such task; choose one of",
    "python -m launch run train.step=3": "error: unknown key train.step; did you mean train.steps?",
}
#: what is not run, and why (a command of another kind fails the test)
NOT_RUN = {
    "mlflow": "a long-running server (tests/test_tracking.py starts a real one)",
    "export": "sets the shell's environment",
    "mkdir": "shell set-up for the next commands",
    "demo": "the whole study, 10+ minutes: make demo (tests/test_demo.py runs a tiny study)",
}
PROGRAMS = ("python", "torchrun", "make", "docker", "kubectl", "mlflow", "export", "mkdir", "sbatch", "pytest")


@dataclass(frozen=True)
class Doc:
    """One documented command: where it is, its text."""

    where: str
    text: str

    def __str__(self) -> str:
        return self.where


def _code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) from fenced shell blocks and indented code lines, continuations joined."""
    out: list[tuple[int, str]] = []
    lines, fence, buf, start = text.split("\n"), None, "", 0
    for i, raw in enumerate(lines, 1):
        if raw.startswith("```"):
            fence = None if fence is not None else raw[3:].strip()
            continue
        in_code = (fence in ("", "bash", "sh", "shell")) or (fence is None and raw.startswith("    ") and
                                                               not raw.lstrip().startswith(("-", "*", "|")))
        if not in_code and not buf:
            continue
        line = raw.strip()
        if not buf:
            start = i
        buf = f"{buf} {line}".strip() if buf else line
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip()
            continue
        command, buf = buf, ""
        if command and not command.startswith("#") and _first_program(command) in PROGRAMS and "──" not in command:
            out.append((start, command))
    return out


def _first_program(command: str) -> str:
    for word in command.split():
        if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", word):
            continue  # an environment prefix
        return word.rsplit("/", 1)[-1] if word.startswith(".venv/") else word
    return ""


def _inline(text: str) -> list[tuple[int, str]]:
    """Inline commands with at least one argument after the program (and its sub-command); not
    mentions of a program or an option (`torchrun --max-restarts=N`, `kubectl apply`, `python -X importtime`)."""
    out = []
    for m in re.finditer(r"`((?:\.venv/bin/)?(?:python|torchrun|make|kubectl|docker) [^`\n]+)`", text):
        words = m.group(1).split()
        module = words[2] if words[1:2] == ["-m"] else None
        rest = words[3:] if module else words[1:]
        if module in ("launch", "data_shards") and rest:
            rest = rest[1:]
        mention = ((words[0] == "torchrun" and "-m" not in words) or (words[0] in ("kubectl", "docker") and len(words) < 4)
                   or (words[0].endswith("python") and words[1] not in ("-m", "-c")
                       and not words[1].startswith("benchmarks/")))
        if rest and not mention and _first_program(m.group(1)) in PROGRAMS:
            out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


def collect() -> list[Doc]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for line, command in sorted(set(_code_lines(text) + _inline(text))):
            found.append(Doc(f"{path.relative_to(ROOT)}:{line}", command))
    return found


COMMANDS = collect()


def words(command: str) -> tuple[list[str], str | None]:
    """The command's words, placeholders filled in, optional ``[--x y]`` groups opened, ``...``
    and alternatives ``a|b`` reduced to the first; and the file a ``>`` redirect writes."""
    text = re.sub(r"\[(--[^\]]*)\]", r"\1", command)
    text = re.sub(r"\[(options|args)\]", "", text)
    text = re.sub(r"\[([a-z_.]+=[^\]]*)\]", r"\1", text)  # an optional group of overrides
    for ph in set(re.findall(r"<[^<>\s][^<>]*>", text)):
        if "|" in ph:
            text = text.replace(ph, ph[1:-1].split("|")[0])
        elif ph in PLACEHOLDERS:
            text = text.replace(ph, PLACEHOLDERS[ph])
        else:
            raise AssertionError(f"placeholder {ph} in {command!r}: give it a value in PLACEHOLDERS")
    argv = shlex.split(text, comments=True)
    redirect = None
    if ">" in argv:
        redirect = argv[argv.index(">") + 1]
        argv = argv[:argv.index(">")]
    argv = [NUMBERS.get(w, w) for w in argv
            if w != "..." and not (w.endswith(("=..", "=...")) and not w.startswith("-"))]  # elided overrides
    argv = [w.split("|")[0] if "|" in w and "://" not in w else w for w in argv]
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
        argv = argv[1:]
    if argv and argv[0].startswith(".venv/bin/"):
        argv[0] = argv[0].rsplit("/", 1)[1]
    return argv, redirect


# ------------------------------------------------------------------ running a main only up to its parser
class _Parsed(BaseException):
    """Raised right after an argparse parser accepted the arguments (nothing else runs)."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__("parsed")
        self.namespace = namespace


def parse_only(run: Callable[[], Any]) -> argparse.Namespace:
    """The namespace the first parser inside ``run()`` produced; fails on an argparse error."""
    real = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_intermixed_args")}

    def stop(name):
        def parse(self, args=None, namespace=None):
            raise _Parsed(real[name](self, args, namespace))
        return parse

    with contextlib.ExitStack() as stack:
        for name in real:
            stack.enter_context(mock.patch.object(argparse.ArgumentParser, name, stop(name)))
        err = io.StringIO()
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            run()
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit as e:
            raise AssertionError(f"argparse refused it (exit {e.code}): {err.getvalue().strip()}") from None
    raise AssertionError("no argument parser was reached")


def quiet(fn: Callable[[], Any]) -> tuple[Any, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = fn()
    return result, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------ the checks, by kind
@pytest.fixture(scope="module")
def place(tmp_path_factory) -> dict[str, Path]:
    """A tiny dataset root, a stand-in for the image's /workspace, a scratch folder."""
    base = tmp_path_factory.mktemp("docs")
    tiny = base / "tiny"
    subprocess.run([sys.executable, "-m", "data_shards", "build", "synthetic", "--out", str(tiny), *TINY],
                   check=True, env=child_env(), cwd=ROOT, timeout=300, capture_output=True)
    (base / "workspace").mkdir()
    return {"tiny": tiny, "workspace": base / "workspace", "scratch": base}


def check_trainer(args: list[str], world_size: int = 1) -> None:
    """What the trainer would check before importing torch, and the engine settings for the world size."""
    from trainer.__main__ import main
    from trainer.compose import load_run_config
    from trainer.distributed import DistEnv
    from trainer.engine.facade import check_settings

    if any(a.startswith("-") for a in args):  # --help, --cfg job: answered before Hydra runs anything
        code, out, err = quiet(lambda: main(args))
        assert code == 0 and out, err
        return
    cfg, _ = load_run_config(args)
    check_settings(cfg.parallel, cfg.optim, int(cfg.train.batch_size), DistEnv(world_size=world_size))


def check_torchrun(args: list[str]) -> None:
    """``torchrun [options] -m trainer OVERRIDES``: the trainer's check for nnodes x nproc_per_node ranks."""
    module = args.index("-m")
    opts = dict(re.match(r"--([a-z_-]+)=?(.*)", a).groups() for a in args[:module] if a.startswith("--"))
    world = int(opts.get("nproc_per_node", opts.get("nproc-per-node", "1"))) * int(opts.get("nnodes", "1"))
    assert args[module + 1] == "trainer", args
    check_trainer(args[module + 2:], world_size=world)


def check_launch(args: list[str], doc: Doc, place: dict[str, Path], monkeypatch) -> None:
    sub, rest = args[0], args[1:]
    if sub == "run":
        from launch.torchrun import main

        if "--sbatch" in rest:
            code, out, err = quiet(lambda: main(rest))
            assert code == 0 and out.startswith("#!/bin/bash") and "srun torchrun" in out, err
        else:
            code, out, err = quiet(lambda: main([*rest, "--dry-run"]))
            assert code == 0 and "torchrun" in out, err
    elif sub == "k8s":
        render_k8s(rest, place["scratch"])
        shards = rest[rest.index("--shards-url") + 1] if "--shards-url" in rest else ""
        dataset = shards.rstrip("/").rsplit("/", 1)[-1]
        if (ROOT / "configs" / "data" / f"{dataset}.yaml").is_file():  # KITTI shards are read with data=kitti
            assert f"data={dataset}" in rest, f"{doc}: shards {shards} need data={dataset}"
    elif sub == "study":
        check_study(rest, place, monkeypatch)
    elif sub == "compare":
        from launch.compare import main
        from launch.study_config import load_study

        ns = parse_only(lambda: main(rest))
        if ns.study is None:
            load_study([f"+experiment={ns.experiment}", *ns.overrides])
    elif sub == "demo":
        pytest.skip(NOT_RUN["demo"])
    else:
        raise AssertionError(f"{doc}: launch {sub}: no check for this sub-command")


def render_k8s(args: list[str], scratch: Path) -> list[dict]:
    """Render ``launch k8s ARGS`` into ``scratch`` and validate every manifest; the documents."""
    from launch.k8s import main
    from test_launch_k8s import validate_doc

    out = scratch / Path(args[args.index("--out") + 1]).name if "--out" in args else scratch / "k8s.yaml"
    if "--out" in args:
        args = [*args[:args.index("--out")], *args[args.index("--out") + 2:]]
    code, _, err = quiet(lambda: main([*args, "--out", str(out)]))
    assert code == 0, err
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    for d in docs:
        validate_doc(d)
    return docs


def check_study(args: list[str], place: dict[str, Path], monkeypatch) -> None:
    from launch.study import main
    from launch.study_config import load_study
    from test_launch_k8s import validate_doc

    if args[:1] == ["replay"]:
        parse_only(lambda: main(args))
        return
    if args[:1] == ["--help"]:
        with pytest.raises(SystemExit) as e:
            quiet(lambda: main(args))
        assert e.value.code == 0
        return
    ns = parse_only(lambda: main(args))
    load_study(ns.overrides)
    if ns.emit == "k8s":  # written for real (into a scratch folder) and validated
        monkeypatch.chdir(place["scratch"])
        code, _, err = quiet(lambda: main([*args, "--out", "study-k8s"]))
        assert code == 0, err
        for f in sorted((place["scratch"] / "study-k8s").glob("*.yaml")):
            for d in yaml.safe_load_all(f.read_text()):
                validate_doc(d)


def check_data_shards(args: list[str], place: dict[str, Path]) -> None:
    from data_shards.__main__ import main

    if args[0] == "build":
        parse_only(lambda: main(args))  # real datasets are not here; synthetic builds run in the docker check
        return
    assert args[0] in ("inspect", "verify"), args
    tiny = place["tiny"]
    rest = []
    for a in args[1:]:
        if a.startswith(("data/", "SHARDS", "/")) and not a.endswith(".png"):
            split = a.rstrip("/").rsplit("/", 1)[-1]
            a = str(tiny / split) if split in ("train", "val", "test") else str(tiny)
        elif a.endswith(".png"):
            a = str(place["scratch"] / a)
        rest.append(a)
    code, out, err = quiet(lambda: main([args[0], *rest]))
    assert code == 0, err


def check_python_module(argv: list[str], doc: Doc, place: dict[str, Path], monkeypatch) -> None:
    module, args = argv[2], argv[3:]
    if module == "trainer":
        check_trainer(args)
    elif module == "launch":
        check_launch(args, doc, place, monkeypatch)
    elif module == "data_shards":
        check_data_shards(args, place)
    elif module in ("trainer.tracking", "trainer.kernels.aot", "data_shards.sources.kitti_export"):
        monkeypatch.setattr(sys, "argv", [module, *args])
        parse_only(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True))
    else:
        raise AssertionError(f"{doc}: python -m {module}: no check for this module")


def check_script(argv: list[str], doc: Doc, monkeypatch) -> None:
    """``python benchmarks/x.py ARGS``: the script exists and its parser accepts ARGS."""
    script = ROOT / argv[1]
    assert script.is_file(), f"{doc}: no {argv[1]}"
    monkeypatch.setattr(sys, "argv", [str(script), *argv[2:]])
    monkeypatch.syspath_prepend(str(script.parent))
    parse_only(lambda: runpy.run_path(str(script), run_name="__main__"))


def check_docker(argv: list[str], doc: Doc, place: dict[str, Path]) -> None:
    """``docker build``: the tag the run lines use; ``docker run``: mounts inside /workspace, and the
    command through the image's entry point in a stand-in /workspace."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    if argv[1] == "build":
        assert argv[2:4] == ["-t", "geoprime:0.1.0"] and dockerfile
        return
    assert argv[1] == "run", argv
    workdir = re.findall(r"^WORKDIR (\S+)", dockerfile, re.M)[-1]
    assert workdir == "/workspace" and "chown -R 1000:1000 /workspace" in dockerfile, \
        "the image's working folder is /workspace, writable for its user (uid 1000)"
    i, with_value = 2, {"--gpus", "--shm-size", "--user", "-v", "--volume", "-e", "--env", "--name", "-w"}
    while argv[i].startswith("-"):
        if argv[i] in ("-v", "--volume"):
            host, container = argv[i + 1].split(":")[:2]
            assert container.startswith("/workspace/") and host == "$PWD/" + container[len("/workspace/"):], \
                f"{doc}: mount {argv[i + 1]}: mount $PWD/<x> at /workspace/<x> (the image's working folder)"
        i += 2 if argv[i] in with_value else 1
    image, args = argv[i], argv[i + 1:]
    assert image == "geoprime:0.1.0", f"{doc}: image {image}"
    if args[:1] == ["torchrun"]:
        check_torchrun(args[1:])
        return
    if args[:5] == ["python", "-m", "data_shards", "build", "synthetic"]:
        args = [*args, *TINY]
    elif not args or "=" in args[0]:  # overrides: python -m trainer, one tiny step on the data built above
        if not (place["workspace"] / "data" / "synthetic" / "train").is_dir():
            subprocess.run([sys.executable, "-m", "data_shards", "build", "synthetic", "--out", "data/synthetic",
                            *TINY], check=True, env=child_env(), cwd=place["workspace"], timeout=300)
        args = [*args, *TINY_RUN]
    env = child_env({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    r = subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), *args], cwd=place["workspace"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{doc}: {r.stderr[-3000:]}"


def check_kubectl(argv: list[str], doc: Doc, place: dict[str, Path]) -> None:
    from launch.k8s import K8sJob
    from test_launch_k8s import validate_doc

    if argv[1] == "apply":
        name = argv[argv.index("-f") + 1]
        if (ROOT / name).is_file():
            docs = [d for d in yaml.safe_load_all((ROOT / name).read_text()) if d]
            for d in docs:
                validate_doc(d)
            if any(d["kind"] == "PersistentVolumeClaim" for d in docs):
                assert {d["metadata"]["name"] for d in docs} == {K8sJob.checkpoint_pvc}
            return
        producer = _producer(doc, lambda a: "--out" in a and a[a.index("--out") + 1] == name)
        assert producer[3] == "k8s", f"{doc}: {name} is made by neither the repository nor a launch k8s line"
        render_k8s(producer[4:], place["scratch"])
        return
    assert argv[1:4] == ["create", "secret", "generic"], f"{doc}: kubectl {argv[1]}: no check for it"
    assert argv[4] == K8sJob.mlflow_secret, f"{doc}: the manifests read Secret {K8sJob.mlflow_secret}"
    keys = {a.split("=", 2)[1] for a in argv[5:] if a.startswith("--from-literal=")}
    assert keys and keys <= {"uri", "username", "password", "aws_access_key_id", "aws_secret_access_key",
                             "aws_endpoint_url"}, keys


def _producer(doc: Doc, matches: Callable[[list[str]], bool]) -> list[str]:
    """The command of the same file that writes what ``doc`` reads."""
    path = doc.where.split(":")[0]
    for other in COMMANDS:
        if other.where.split(":")[0] == path:
            argv, redirect = words(other.text)
            if matches(argv) or (redirect and matches([">", redirect])):
                return argv
    raise AssertionError(f"{doc}: nothing in {path} writes what it reads")


def check_make(argv: list[str], doc: Doc) -> None:
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    for target in argv[1:]:
        if "=" not in target:
            assert target in targets, f"{doc}: no make target {target!r} (Makefile has {sorted(targets)})"


def check_expected_error(argv: list[str], doc: Doc) -> None:
    """A command the docs show failing: exit 2 and the documented line."""
    from launch.__main__ import main as launch_main
    from trainer.__main__ import main as trainer_main

    main = {"trainer": trainer_main, "launch": launch_main}[argv[2]]
    code, out, err = quiet(lambda: main(argv[3:]))
    assert code == 2 and err.startswith(EXPECTED_ERRORS[doc.text]) and len(err.splitlines()) == 1, (out, err)


def check(doc: Doc, place: dict[str, Path], monkeypatch) -> None:
    argv, _ = words(doc.text)
    program = argv[0]
    if program in NOT_RUN:
        pytest.skip(NOT_RUN[program])
    if doc.text in EXPECTED_ERRORS:
        check_expected_error(argv, doc)
        return
    if program == "python" and argv[1:2] == ["-m"]:
        check_python_module(argv, doc, place, monkeypatch)
    elif program == "python" and argv[1:2] == ["-c"]:
        compile(argv[2], doc.where, "exec")
    elif program == "python":
        check_script(argv, doc, monkeypatch)
    elif program == "torchrun":
        check_torchrun(argv[1:])
    elif program == "pytest":
        assert all((ROOT / a).is_file() for a in argv[1:] if a.startswith("tests/")), doc
    elif program == "make":
        check_make(argv, doc)
    elif program == "docker":
        check_docker(argv, doc, place)
    elif program == "kubectl":
        check_kubectl(argv, doc, place)
    elif program == "sbatch":
        script = _producer(doc, lambda a: a[:1] == [">"] and a[1] == argv[1])
        assert script[2:4] == ["launch", "run"] and "--sbatch" in script, doc
    else:
        raise AssertionError(f"{doc}: {program}: no check for this program")


def test_every_documented_command_has_a_check():
    assert len(COMMANDS) > 80  # the collector still finds the docs' commands
    unknown = [f"{d}: {d.text}" for d in COMMANDS if words(d.text)[0][0] not in (*PROGRAMS, *NOT_RUN)]
    assert unknown == []


@pytest.mark.timeout(600)
@pytest.mark.parametrize("doc", COMMANDS, ids=str)
def test_documented_command_works(doc, place, monkeypatch):
    monkeypatch.chdir(place["scratch"])  # relative paths of the docs land in a scratch folder
    check(doc, place, monkeypatch)


def test_make_setup_says_what_it_does(tmp_path):
    """`make setup` (the first step of `make demo` / `make test`) announces the install, shows pip's
    progress (no -q) and reports its time."""
    r = subprocess.run(["make", "--dry-run", "--always-make", "setup", f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "[setup] installing the pinned dependencies" in r.stdout and "[setup] done in" in r.stdout
    install = next(line for line in r.stdout.splitlines() if "pip install" in line)
    assert " -q " not in install
