"""Mixed precision on whatever device this machine has (CPU in CI, a GPU when one is there):
bf16 / fp16 autocast with fp32 master weights, fp16 loss scaling that skips overflowing steps
(on every rank alike) and is checkpointed, and every strategy agreeing with a one-process run at
the same precision. DeepSpeed takes bf16 only (fp16 is refused, see trainer.engine).

This file is also the torchrun worker: ``python tests/test_precision.py <out_dir> <name>...``.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_engine import (ACCUM, MICRO, STEPS, STRATEGIES, global_batches, ocfg, pcfg, scfg,  # noqa: E402
                         tiny_model, train_steps)
from trainer.engine import Engine  # noqa: E402

#: (strategy name in test_engine.STRATEGIES, precision) run by the 2-rank test
DIST_CASES = [("ddp", "bf16"), ("ddp", "fp16"), ("fsdp", "bf16"), ("fsdp", "fp16"), ("zero1", "bf16"),
              ("zero2", "bf16"), ("zero3", "bf16")]


def _engine(strategy="single", stage=0, offload=False, precision="fp32", accum=ACCUM, world=1) -> Engine:
    """An engine set up on the tiny model; fp16 starts at loss scale 1024, where no step of
    these runs overflows (at the default 65536 whether the first step overflows depends on the
    micro-batch split, which would make runs with different splits incomparable)."""
    eng = Engine(pcfg(strategy, stage, offload, precision), ocfg(accum=accum), scfg(), 10,
                 micro_batch_size=MICRO if accum > 1 else MICRO * ACCUM * world)
    eng.setup(tiny_model())
    if eng.scaler is not None:
        eng.scaler.load_state_dict({**eng.scaler.state_dict(), "scale": 1024.0})
    return eng


def single_reference(precision: str, world: int) -> dict:
    """One process, the whole global batch, no accumulation: weights after STEPS steps."""
    eng = _engine(precision=precision, accum=1, world=world)
    train_steps(eng, global_batches(world), range(STEPS), world)
    return eng.full_state_dict()


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------------------------ worker (under torchrun)
def worker(out: Path, cases: list[str]) -> None:
    """Each ``name:precision``: STEPS steps and export; for fp16 also one step whose loss is
    infinite on the last rank only (every rank must skip it and halve the same scale)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    data = global_batches(world)
    for case in cases:
        name, precision = case.split(":")
        strategy, stage, offload = STRATEGIES[name]
        eng = _engine(strategy, stage, offload, precision)
        train_steps(eng, data, range(STEPS), world)
        weights = eng.full_state_dict()
        res = {}
        if precision == "fp16":
            scale = eng.scaler.get_scale()
            for m in range(ACCUM):
                with eng.accumulate(m):
                    loss = eng.forward(lambda parts, x: parts["head"](parts["enc"](x)).mean(), data[0][:MICRO])
                    if rank == world - 1:
                        loss = loss * float("inf")
                    eng.backward(loss)
            eng.step()
            skipped = eng.full_state_dict()
            res = {"scale_before": scale, "scale_after": eng.scaler.get_scale(),
                   "unchanged": all(torch.equal(skipped[k], weights[k]) for k in weights)}
        res["scales"] = eng.all_gather_object(res.get("scale_after"))
        res["unchanged_all"] = eng.all_gather_object(res.get("unchanged"))
        if rank == 0:
            torch.save(weights, out / f"{name}_{precision}.pt")
            json.dump(res, open(out / f"{name}_{precision}.json", "w"))
        eng.close()
    dist.destroy_process_group()


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_fp32_master_weights(precision):
    """Autocast really computes in low precision (the conv output dtype, weights differ from
    fp32's), the loss falls, parameters and their optimizer state stay fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seen = []

    def loss_fn(parts, x):
        y = parts["head"](parts["enc"](x))
        seen.append(y.dtype)
        return (y.float() - x[:, :1]).pow(2).mean()

    losses, weights = {}, {}
    for prec in ("fp32", precision):
        eng = Engine(pcfg(precision=prec), ocfg(accum=1, clip=0.0), scfg("constant", 0), 10, micro_batch_size=8)
        eng.setup(tiny_model())
        x = global_batches(1)[0].to(device)
        losses[prec] = []
        for _ in range(6):
            with eng.accumulate(0):
                loss = eng.forward(loss_fn, x)
                eng.backward(loss)
            eng.step()
            losses[prec].append(float(loss))
        weights[prec] = eng.full_state_dict()
        assert all(p.dtype == torch.float32 for p in eng.parts.parameters())
        assert all(v.dtype == torch.float32 for st in eng.optimizer.state.values() for v in st.values()
                   if torch.is_tensor(v) and v.is_floating_point())
        eng.close()
    assert seen[0] == torch.float32 and seen[-1] == dtype
    low = losses[precision]
    assert all(math.isfinite(v) for v in low) and low[-1] < 0.6 * low[0]
    diff = _max_diff(weights[precision], weights["fp32"])
    assert 0 < diff < 0.05, f"{precision} weights differ from fp32 by {diff}"


def test_fp16_loss_scale_skips_overflow_and_is_checkpointed(tmp_path):
    """An infinite loss: the optimizer step is skipped (weights unchanged), the scale halves,
    and the scale survives a save / load into a fresh engine."""
    eng = _engine(precision="fp16", accum=1)
    x = global_batches(1)[0]
    train_steps(eng, global_batches(1), range(2), 1)
    before, scale = eng.full_state_dict(), eng.scaler.get_scale()
    with eng.accumulate(0):
        eng.backward(eng.forward(lambda parts, x: parts["head"](parts["enc"](x)).mean() * float("inf"), x))
    eng.step()
    after = eng.full_state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert eng.scaler.get_scale() == scale / 2
    eng.save_state(tmp_path)
    eng.close()

    fresh = _engine(precision="fp16", accum=1)
    assert fresh.scaler.get_scale() == 1024.0
    fresh.load_state(tmp_path)
    assert fresh.scaler.get_scale() == scale / 2
    loaded = fresh.full_state_dict()
    assert all(torch.equal(loaded[k], before[k]) for k in before)
    fresh.close()


def test_deepspeed_fp16_is_refused_with_the_alternatives():
    from trainer.engine import deepspeed_config

    with pytest.raises(ValueError, match="fp16 is not supported with DeepSpeed.*bf16, or parallel=fsdp with fp16"):
        Engine(pcfg("deepspeed", 2, precision="fp16"), ocfg(), scfg(), 10)
    with pytest.raises(ValueError, match="fp16 is not supported with DeepSpeed"):
        deepspeed_config(pcfg("deepspeed", 2, precision="fp16"), ocfg(), 1)
    assert deepspeed_config(pcfg("deepspeed", 2, precision="bf16"), ocfg(), 1)["torch_autocast"] == {
        "enabled": True, "dtype": "bfloat16"}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_strategies_agree_at_mixed_precision(tmp_path):
    """DDP, FSDP2 (ShardedGradScaler for fp16) and ZeRO 1/2/3 in bf16 / fp16 on 2 ranks match a
    one-process run at the same precision, and an overflow on one rank skips the step on all."""
    from dist_helpers import run_torchrun

    run_torchrun([__file__, str(tmp_path), *(f"{n}:{p}" for n, p in DIST_CASES)], nproc=2, timeout=280)
    refs = {p: single_reference(p, 2) for p in ("bf16", "fp16")}
    fp32 = single_reference("fp32", 2)
    for name, precision in DIST_CASES:
        got = torch.load(tmp_path / f"{name}_{precision}.pt", weights_only=True)
        res = json.load(open(tmp_path / f"{name}_{precision}.json"))
        same, full = _max_diff(got, refs[precision]), _max_diff(got, fp32)
        # measured: ~3e-5 from the same precision, ~9e-5 from fp32 after 3 steps
        assert same < 1e-4 and same < 0.5 * full, f"{name} {precision}: {same} from one-process {precision}, {full} from fp32"
        if precision == "fp16":
            assert res["scales"] == [res["scale_before"] / 2] * 2, f"{name}: {res}"
            assert res["unchanged_all"] == [True, True], f"{name}: the overflowing step was not skipped everywhere"


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
