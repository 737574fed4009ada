"""Engine: schedules, optimizers, DeepSpeed config generation, and every strategy (DDP, FSDP2,
ZeRO 1/2/3, ZeRO-3 + CPU offload) agreeing with a single-process reference on the same global
batch, with a state round trip (a staged snapshot written on a thread while training goes on) and a
plain-weights export per strategy; 2-rank FSDP2 (DCP
resharding) and ZeRO-2 / ZeRO-3 (DeepSpeed's universal format) checkpoints resumed on 1 rank.

This file is also the torchrun worker: ``python tests/test_engine.py <mode> <out_dir> ...``.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer.engine import Engine, deepspeed_config  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.schedules import lr_multiplier  # noqa: E402

MICRO, ACCUM, STEPS = 2, 2, 3
STRATEGIES = {"ddp": ("ddp", 0, False), "fsdp": ("fsdp", 0, False), "zero1": ("deepspeed", 1, False),
              "zero2": ("deepspeed", 2, False), "zero3": ("deepspeed", 3, False),
              "zero3_offload": ("deepspeed", 3, True)}


def pcfg(strategy="single", stage=0, offload=False, precision="fp32"):
    return NS(strategy=strategy, zero_stage=stage, offload=offload, precision=precision, channels_last=False,
              compile=False, backend="auto", find_unused_parameters=False)


def ocfg(accum=ACCUM, name="adamw", clip=0.5):
    return NS(name=name, lr=1e-2, weight_decay=0.01, momentum=0.9, betas=(0.9, 0.999), grad_accum=accum,
              clip_grad_norm=clip)


def scfg(name="cosine", warmup=1):
    return NS(name=name, warmup_steps=warmup, min_lr_ratio=0.1, poly_power=2.0, step_size=2, gamma=0.5)


def tiny_model() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({"enc": nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()),
                          "head": nn.Conv2d(4, 1, 1)})


def loss_fn(parts, x):
    return (parts["head"](parts["enc"](x)) - x[:, :1]).pow(2).mean()


def global_batches(world: int) -> torch.Tensor:
    """(steps+1, world*accum*micro, 3, 8, 8): the same global batches for every world size."""
    g = torch.Generator().manual_seed(7)
    return torch.rand(STEPS + 1, world * ACCUM * MICRO, 3, 8, 8, generator=g)


def train_steps(eng: Engine, data: torch.Tensor, steps: range, world: int) -> list[float]:
    """Micro-batch ``m`` of rank ``r`` is chunk ``m * world + r`` of the global batch."""
    norms = []
    for s in steps:
        chunks = data[s].view(ACCUM * world, -1, 3, 8, 8)
        for m in range(eng.grad_accum):
            with eng.accumulate(m):
                if eng.grad_accum == 1:  # reference: the whole global batch at once
                    x = data[s]
                else:
                    x = chunks[m * eng.world_size + eng.rank]
                eng.backward(eng.forward(loss_fn, x))
        norms.append(eng.step())
    return norms


def reference(world: int) -> tuple[dict, list[float], dict]:
    """Single process, whole global batch, no accumulation: weights after STEPS and STEPS+1."""
    eng = Engine(pcfg(), ocfg(accum=1), scfg(), 10, micro_batch_size=MICRO * ACCUM * world)
    eng.setup(tiny_model())
    data = global_batches(world)
    norms = train_steps(eng, data, range(STEPS), world)
    w3 = eng.full_state_dict()
    train_steps(eng, data, range(STEPS, STEPS + 1), world)
    return w3, norms, eng.full_state_dict()


def staged_round_trip(eng: Engine, directory: Path, data: torch.Tensor, world: int) -> dict:
    """Stage a checkpoint of ``eng`` now (a CPU snapshot), take step STEPS, write the snapshot on a thread
    while this one makes collectives of its own, load it, take step STEPS again. Returns whether staging
    wrote no state file yet and the states after the step, once loaded and after the step again."""
    import threading

    write = eng.stage_state(directory)
    staged_bytes = eng.all_gather_object(eng.stage_times.get("bytes"))  # what each rank copied
    staged_only = not any(p.suffix in (".pt", ".distcp") for p in directory.rglob("*"))
    train_steps(eng, data, range(STEPS, STEPS + 1), world)  # changes weights and Adam moments in place
    after = eng.full_state_dict()
    writer = threading.Thread(target=write)
    writer.start()
    for _ in range(20):  # the training thread's collectives meanwhile, on the default group
        eng.all_reduce_sum(torch.ones(3))
    writer.join()
    eng.barrier()
    eng.load_state(directory)
    loaded = eng.full_state_dict()
    train_steps(eng, data, range(STEPS, STEPS + 1), world)  # the same step again, from the loaded moments
    return {"staged_only": staged_only, "staged_bytes": staged_bytes, "after": after, "loaded": loaded,
            "again": eng.full_state_dict()}


# ------------------------------------------------------------------ worker (under torchrun)
def worker_agree(out: Path, names: list[str]) -> None:
    """Every strategy in ``names``: STEPS steps, export, then :func:`staged_round_trip`."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    data = global_batches(world)
    for name in names:
        strategy, stage, offload = STRATEGIES[name]
        eng = Engine(pcfg(strategy, stage, offload), ocfg(), scfg(), 10, micro_batch_size=MICRO)
        eng.setup(tiny_model())
        norms = train_steps(eng, data, range(STEPS), world)
        eng.export_weights(out / f"{name}.pt")
        rt = staged_round_trip(eng, out / f"ck_{name}", data, world)
        if rank == 0:
            exported = torch.load(out / f"{name}.pt", weights_only=True)
            torch.save(rt["after"], out / f"{name}_step4.pt")
            json.dump({"norms": norms, "lr": eng.lr, "staged_only": rt["staged_only"],
                       "staged_bytes": rt["staged_bytes"],
                       "reload_equal": all(torch.equal(rt["loaded"][k], v) for k, v in exported.items()),
                       "again_equal": all(torch.equal(rt["again"][k], v) for k, v in rt["after"].items())},
                      open(out / f"{name}.json", "w"))
        eng.close()
    dist.destroy_process_group()


def worker_deepspeed_reshard(out: Path, names: list[str]) -> None:
    """One rank loads each 2-rank DeepSpeed checkpoint ``ck_<name>`` (converted to DeepSpeed's
    universal format), takes step STEPS+1 on the same global batch, then saves and reloads at its
    own world size (the plain path again)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    for name in names:
        strategy, stage, offload = STRATEGIES[name]
        eng = Engine(pcfg(strategy, stage, offload), ocfg(accum=1), scfg(), 10, micro_batch_size=MICRO * ACCUM * 2)
        eng.setup(tiny_model())
        eng.load_state(out / f"ck_{name}", saved_world_size=2)
        torch.save(eng.full_state_dict(), out / f"{name}_resharded.pt")
        train_steps(eng, global_batches(2), range(STEPS, STEPS + 1), 2)
        after = eng.full_state_dict()
        torch.save(after, out / f"{name}_resharded_step4.pt")
        eng.save_state(out / f"ck_{name}_1rank")
        train_steps(eng, global_batches(2), range(STEPS, STEPS + 1), 2)  # moves the weights on
        eng.load_state(out / f"ck_{name}_1rank", saved_world_size=1)
        again = eng.full_state_dict()
        json.dump({"reload_equal": all(torch.equal(again[k], after[k]) for k in after)},
                  open(out / f"{name}_resharded.json", "w"))
        eng.close()
    dist.destroy_process_group()


# ------------------------------------------------------------------ unit tests
def test_schedules_hand_computed():
    cos = lr_multiplier(scfg("cosine", warmup=2), 10)
    assert [cos(0), cos(1)] == [0.5, 1.0]
    assert cos(2) == pytest.approx(1.0)
    assert cos(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos(10) == pytest.approx(0.1)
    poly = lr_multiplier(scfg("poly", warmup=0), 10)
    assert poly(5) == pytest.approx(0.25)
    step = lr_multiplier(scfg("step", warmup=0), 10)
    assert [step(0), step(1), step(2), step(5)] == [1.0, 1.0, 0.5, 0.25]
    assert lr_multiplier(scfg("constant", warmup=0), 10)(9) == 1.0
    with pytest.raises(ValueError, match="schedule.name='linear'"):
        lr_multiplier(scfg("linear"), 10)


def test_optimizers_and_errors():
    p = [nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer(p, ocfg(name="sgd")), torch.optim.SGD)
    assert isinstance(build_optimizer(p, ocfg(name="adam")), torch.optim.Adam)
    assert isinstance(build_optimizer(p, ocfg(name="adamw")), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optim.name='lamb'"):
        build_optimizer(p, ocfg(name="lamb"))
    with pytest.raises(ValueError, match="parallel.strategy='horovod'"):
        Engine(pcfg("horovod"), ocfg(), scfg(), 10)
    with pytest.raises(ValueError, match="parallel.precision='fp8'"):
        Engine(pcfg(precision="fp8"), ocfg(), scfg(), 10)


def test_deepspeed_config_generated_from_ours():
    cfg = deepspeed_config(pcfg("deepspeed", 3, offload=True), ocfg(accum=4, clip=1.5), 8)
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 1.5 and cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "offload_param" not in deepspeed_config(pcfg("deepspeed", 2, offload=True), ocfg(), 1)["zero_optimization"]
    with pytest.raises(ValueError, match="zero_stage=0"):
        deepspeed_config(pcfg("deepspeed", 0), ocfg(), 1)


def test_single_accumulation_equals_big_batch():
    """grad_accum=2 on half batches == one step on the whole batch (same process)."""
    w_ref, n_ref, _ = reference(1)
    eng = Engine(pcfg(), ocfg(), scfg(), 10, micro_batch_size=MICRO)
    eng.setup(tiny_model())
    norms = train_steps(eng, global_batches(1), range(STEPS), 1)
    got = eng.full_state_dict()
    for k in w_ref:
        torch.testing.assert_close(got[k], w_ref[k], rtol=1e-5, atol=1e-6)
    assert norms == pytest.approx(n_ref, rel=1e-5)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_step_without_the_norm_makes_the_same_update(clip):
    """``step(want_norm=False)`` (the loop's off-log steps) returns None and skips the norm's pass unless
    clipping needs it: the weights after a few steps are bit-equal to ``want_norm=True``'s."""
    states, norms = {}, {}
    for want in (True, False):
        eng = Engine(pcfg(), ocfg(accum=1, clip=clip), scfg(), 10, micro_batch_size=MICRO * ACCUM)
        eng.setup(tiny_model())
        data, out = global_batches(1), []
        for s in range(STEPS):
            with eng.accumulate(0):
                eng.backward(eng.forward(loss_fn, data[s]))
            out.append(eng.step(want_norm=want))
        states[want], norms[want] = eng.full_state_dict(), out
    assert norms[False] == [None] * STEPS and all(n > 0 for n in norms[True])
    for k in states[True]:
        torch.testing.assert_close(states[False][k], states[True][k], rtol=0, atol=0)


def test_channels_last_matches_default_layout():
    """channels_last changes the memory layout only: same weights after a few steps."""
    got = {}
    for cl in (False, True):
        p = pcfg()
        p.channels_last = cl
        eng = Engine(p, ocfg(), scfg(), 10, micro_batch_size=MICRO)
        eng.setup(tiny_model())
        if cl:
            assert eng.parts["enc"][0].weight.is_contiguous(memory_format=torch.channels_last)
        data = global_batches(1)
        for s in range(STEPS):
            chunks = data[s].view(ACCUM, -1, 3, 8, 8)
            for m in range(ACCUM):
                with eng.accumulate(m):
                    x = eng.to_device({"x": chunks[m]})["x"]
                    assert x.is_contiguous(memory_format=torch.channels_last) == cl
                    eng.backward(eng.forward(loss_fn, x))
            eng.step()
        got[cl] = eng.full_state_dict()
    for k in got[False]:
        torch.testing.assert_close(got[True][k], got[False][k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_compile_matches_eager():
    """parallel.compile=true (each part torch.compile'd; ~35 s cold on CPU, ~5 s with a warm
    TORCHINDUCTOR_CACHE_DIR): same weights as eager, same state_dict keys (no _orig_mod)."""
    p = pcfg()
    p.compile = True
    eng = Engine(p, ocfg(), scfg(), 10, micro_batch_size=MICRO)
    eng.setup(tiny_model())
    train_steps(eng, global_batches(1), range(STEPS), 1)
    got = eng.full_state_dict()
    ref, _, _ = reference(1)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(500)
def test_strategies_agree_with_single_process_and_reshard(tmp_path):
    from dist_helpers import run_torchrun

    names = list(STRATEGIES)
    run_torchrun([__file__, "agree", str(tmp_path), *names], nproc=2, timeout=280)
    w_ref, n_ref, w4_ref = reference(2)
    for name in names:
        res = json.load(open(tmp_path / f"{name}.json"))
        exported = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        plain = tiny_model()
        plain.load_state_dict(exported)  # the export loads into the plain model, keys and shapes
        for k in w_ref:
            torch.testing.assert_close(exported[k], w_ref[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
        step4 = torch.load(tmp_path / f"{name}_step4.pt", weights_only=True)
        for k in w4_ref:
            torch.testing.assert_close(step4[k], w4_ref[k], rtol=1e-5, atol=1e-6, msg=f"{name} step 4 {k}")
        assert res["norms"] == pytest.approx(n_ref, rel=1e-4), name
        assert res["staged_only"], f"{name}: staging wrote a state file"
        # the snapshot: what was written after a step is the state staged before it (issue 31.3)
        assert res["reload_equal"] and res["again_equal"], f"{name}: state round trip is not exact"
        if name in ("ddp", "fsdp"):  # each rank copies only what it writes: together the state once
            params = [v.numel() * v.element_size() for v in w_ref.values()]
            whole = 3 * sum(params) + 4 * len(params)  # weights, Adam's two moments, its step counts
            assert sum(res["staged_bytes"]) == whole, (name, res["staged_bytes"], whole)
            assert max(res["staged_bytes"]) <= whole / 2 + max(params), (name, res["staged_bytes"])

    # FSDP2 resharding: the 2-rank DCP checkpoint (after STEPS steps) loads into a 1-rank FSDP2
    # run, and its next step on the same global batch matches the reference's step 4
    eng = Engine(pcfg("fsdp"), ocfg(accum=1), scfg(), 10, micro_batch_size=MICRO * ACCUM * 2)
    try:
        eng.setup(tiny_model())
        eng.load_state(tmp_path / "ck_fsdp")
        loaded = eng.full_state_dict()
        for k in w_ref:
            torch.testing.assert_close(loaded[k], w_ref[k], rtol=1e-5, atol=1e-6, msg=f"resharded {k}")
        train_steps(eng, global_batches(2), range(STEPS, STEPS + 1), 2)
        after = eng.full_state_dict()
        for k in w4_ref:  # equal optimizer state (Adam moments) is what makes this step agree
            torch.testing.assert_close(after[k], w4_ref[k], rtol=1e-5, atol=1e-6, msg=f"resharded step 4 {k}")
    finally:
        eng.close()

    # DeepSpeed: the 2-rank ZeRO-2 / ZeRO-3 checkpoints resumed on 1 rank through the universal
    # format continue exactly like the reference, and the 1-rank save after that round-trips
    resharded = ["zero2", "zero3"]
    run_torchrun([__file__, "ds_reshard", str(tmp_path), *resharded], nproc=1, timeout=200)
    for name in resharded:
        assert (tmp_path / f"ck_{name}" / "deepspeed_universal").is_dir()
        loaded = torch.load(tmp_path / f"{name}_resharded.pt", weights_only=True)
        after = torch.load(tmp_path / f"{name}_resharded_step4.pt", weights_only=True)
        for k in w_ref:
            torch.testing.assert_close(loaded[k], w_ref[k], rtol=1e-5, atol=1e-6, msg=f"{name} resharded {k}")
            torch.testing.assert_close(after[k], w4_ref[k], rtol=1e-5, atol=1e-6, msg=f"{name} resharded step 4 {k}")
        assert json.load(open(tmp_path / f"{name}_resharded.json"))["reload_equal"], name


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "agree":
        worker_agree(out, sys.argv[3:])
    elif mode == "ds_reshard":
        worker_deepspeed_reshard(out, sys.argv[3:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
