"""Each rank's share of a DCP state dict (trainer/engine/dcp_share.py): disjoint, together whole, balanced,
module buffers and non-tensor values on rank 0, the nesting kept. (Sharded DTensors, which stay on every
rank, and the checkpoint written from the shares: tests/test_engine.py and tests/test_checkpoint.py.)"""
from __future__ import annotations

import torch

from trainer.engine.dcp_share import leaves, own_share


def _state() -> dict:
    model = {f"layer{i}.weight": torch.zeros(10 * (i + 1)) for i in range(6)}
    model["bn.running_mean"] = torch.zeros(100)  # the largest, but a buffer: rank 0's whatever the balance
    optim = {"state": {f"layer{i}.weight": {"step": torch.tensor(3.0), "exp_avg": torch.zeros(10 * (i + 1)),
                                            "exp_avg_sq": torch.zeros(10 * (i + 1))} for i in range(6)},
             "param_groups": [{"lr": 0.1, "params": [f"layer{i}.weight" for i in range(6)]}]}
    return {"model": model, "optim": optim}


def _nbytes(tree: dict) -> int:
    return sum(v.numel() * v.element_size() for _, v in leaves(tree) if torch.is_tensor(v))


def test_shares_are_disjoint_whole_and_balanced():
    state, buffers = _state(), {("model", "bn.running_mean")}
    whole = dict(leaves(state))
    for world in (2, 3):
        shares = [own_share(state, r, world, buffers) for r in range(world)]
        got = [dict(leaves(s)) for s in shares]
        assert sum(len(g) for g in got) == len(whole)  # disjoint ...
        merged = {p: v for g in got for p, v in g.items()}
        assert merged.keys() == whole.keys() and all(merged[p] is whole[p] for p in whole)  # ... and whole, uncopied
        assert ("model", "bn.running_mean") in got[0] and ("optim", "param_groups") in got[0]
        sizes = [_nbytes(s) for s in shares]
        assert max(sizes) - min(sizes) <= 400  # even to within the largest entry
        assert shares[1]["optim"]["state"]  # the same nesting as the whole state dict
    assert own_share(state, 0, 1, buffers) is state
