"""Flow pre-training: warping with ground-truth flow reproduces the next frame on the synthetic
world, the loss prefers the true flow, the siamese encoder is one shared module, exports load."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from data_shards.sources.synthetic import SyntheticConfig, iter_samples
from trainer.config import ModelConfig
from trainer.losses.photometric import photometric_error
from trainer.models.flow_net import FlowDecoder, flow_to_pixel_coords
from trainer.tasks.flow import FlowConfig, FlowTask, warp_by_flow
from trainer.tasks.segmentation import SegmentationConfig, SegmentationTask


def _chw(a):
    return torch.from_numpy(a).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def samples():
    cfg = SyntheticConfig(height=48, width=160, sequences={"train": 1}, frames_per_sequence=4)
    return list(itertools.islice(iter_samples("train", cfg), 2))


def test_warping_next_frame_with_gt_flow_reproduces_the_frame(samples):
    for s in samples:
        rgb, nxt = _chw(s["rgb"]).float() / 255, _chw(s["rgb_next"]).float() / 255
        flow = _chw(s["flow"])
        warped, inside = warp_by_flow(nxt, flow[:, :2])
        valid = (flow[:, 2:3] > 0.5) & inside
        assert valid.float().mean() > 0.5
        err = (warped - rgb).abs().mean(1, keepdim=True)[valid]
        no_motion = (nxt - rgb).abs().mean(1, keepdim=True)[valid]
        assert err.median() < 0.01  # texture resampling error only
        assert err.mean() < 0.6 * no_motion.mean()


def test_integer_shift_is_exact():
    img = torch.rand(1, 3, 10, 12)
    nxt = torch.zeros_like(img)
    nxt[..., 2:, 3:] = img[..., :-2, :-3]  # everything moved 3 px right, 2 px down
    flow = torch.zeros(1, 2, 10, 12)
    flow[:, 0], flow[:, 1] = 3.0, 2.0
    warped, inside = warp_by_flow(nxt, flow)
    assert torch.equal(inside[0, 0], torch.zeros(10, 12, dtype=torch.bool).index_fill_(0, torch.arange(8), True)
                       & torch.zeros(10, 12, dtype=torch.bool).index_fill_(1, torch.arange(9), True))
    torch.testing.assert_close(warped[..., :8, :9], img[..., :8, :9])
    assert flow_to_pixel_coords(flow)[0, 4, 5].tolist() == [8.0, 6.0]


class FixedFlow(torch.nn.Module):
    """Stands in for the flow decoder: a fixed flow (1, 2, H, W) in pixels at every scale (and a
    parameter, so the loss has a graph)."""

    def __init__(self, flow, scales=(0,)):
        super().__init__()
        self.flow, self.scales, self.w = flow, scales, torch.nn.Parameter(torch.zeros(()))

    def fractions(self, fa, fb):
        h, w = self.flow.shape[-2:]
        hp, wp = fa[0].shape[-2] * 2, fa[0].shape[-1] * 2  # the padded input (stride-2 features)
        frac = F.pad(self.flow, (0, wp - w, 0, hp - h)) / torch.tensor([wp, hp]).view(1, 2, 1, 1)
        return {s: F.avg_pool2d(frac, 2 ** s) + self.w for s in self.scales}


def _reference_photometric(fixed, batch, size):
    """Mean over the scales of photometric_error (trainer/losses) of the next frame warped by
    each scale's flow upsampled to the padded size (pixels), cropped: the loss computed by hand."""
    target, source = batch["rgb"].float() / 255, batch["rgb_next"].float() / 255
    (h, w), pad = target.shape[-2:], torch.tensor([size[1], size[0]]).view(1, 2, 1, 1)
    feats = [torch.zeros(1, 1, size[0] // 2, size[1] // 2)]
    errs = [photometric_error(warp_by_flow(source, (F.interpolate(f, size=size, mode="bilinear") * pad)[..., :h, :w])[0],
                              target).mean() for f in fixed.fractions(feats, feats).values()]
    return torch.stack(errs).mean().item()


def test_loss_prefers_true_flow_and_trains_the_shared_encoder(samples):
    task = FlowTask(FlowConfig(scales=[0, 1, 2, 3]), ModelConfig())
    model = task.build_model()
    s = samples[0]
    batch = {"rgb": _chw(s["rgb"]), "rgb_next": _chw(s["rgb_next"])}
    gt = _chw(s["flow"])[:, :2]
    losses = {}
    for name, f in (("gt", gt), ("zero", torch.zeros_like(gt)), ("half", gt / 2)):
        m = torch.nn.ModuleDict({"encoder": model["encoder"], "flow_decoder": FixedFlow(f, (0, 1, 2, 3))})
        losses[name] = task.training_step(m, batch)[1]["photometric"].item()
        # the stacked scales (one warp, depth's loss kernels) compute the per-scale loss
        assert losses[name] == pytest.approx(_reference_photometric(m["flow_decoder"], batch, (64, 160)), rel=1e-4)
    assert losses["gt"] < 0.7 * losses["zero"] and losses["gt"] < losses["half"] < losses["zero"], losses
    loss, logs = task.training_step(model, batch)
    loss.backward()
    assert set(logs) == {"photometric", "smoothness"} and torch.isfinite(loss)
    assert model["encoder"].layers["stem"][0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = task.eval_step(model, {**batch, "flow": _chw(s["flow"])})
    metric = task.new_metric()
    metric.update({"flow": _chw(s["flow"])}, out)
    r = metric.compute(metric.state())
    assert out["flow"].shape == (1, 2, 48, 160) and r["epe"] > 0 and r["flow_pixels"] > 0


def test_eval_returns_the_decoders_flow_in_pixels(samples):
    """The evaluated flow is the decoder's (padded-size fraction x padded size, cropped): with the
    ground truth as the decoder's output, EPE is 0 and zero flow's is the mean GT magnitude."""
    task = FlowTask(FlowConfig(scales=[0]), ModelConfig())
    s = samples[0]
    gt = _chw(s["flow"])
    model = torch.nn.ModuleDict({"encoder": task.build_model()["encoder"], "flow_decoder": FixedFlow(gt[:, :2])})
    with torch.no_grad():
        out = task.eval_step(model, {"rgb": _chw(s["rgb"]), "rgb_next": _chw(s["rgb_next"])})
    metric = task.new_metric()
    metric.update({"flow": gt}, out)
    r = metric.compute(metric.state())
    valid = gt[0, 2] > 0.5
    assert r["epe"] < 1e-5 and r["flow_pixels"] == valid.sum()
    assert r["baseline_epe"] == pytest.approx(gt[0, :2].norm(dim=0)[valid].double().mean().item(), rel=1e-6)


def test_train_transform_flips_frames_and_flow_together():
    task = FlowTask(FlowConfig(flip_prob=1.0, jitter_prob=0.0), ModelConfig())
    s = {"__key__": "k", "rgb": torch.arange(12, dtype=torch.uint8).reshape(1, 2, 6).repeat(3, 1, 1),
         "rgb_next": torch.zeros(3, 2, 6, dtype=torch.uint8), "flow": torch.ones(3, 2, 6), "meta": {}}
    out = task.train_transform(s, torch.Generator().manual_seed(0))
    assert torch.equal(out["rgb"], s["rgb"].flip(-1)) and torch.equal(out["aug_rgb"], out["rgb"])
    assert (out["flow"][0] == -1).all() and (out["flow"][1] == 1).all() and "meta" not in out


def test_flow_export_initialises_segmentation(tmp_path):
    model_cfg = ModelConfig()
    flow_model = FlowTask(FlowConfig(), model_cfg).build_model()
    assert sorted(flow_model) == ["encoder", "flow_decoder"]
    torch.save(flow_model.state_dict(), tmp_path / "weights.pt")
    seg = SegmentationTask(SegmentationConfig(init="flow", weights=str(tmp_path / "weights.pt")),
                           model_cfg).build_model()
    assert torch.equal(seg["encoder"].layers["layer4"][1].conv2.weight,
                       flow_model["encoder"].layers["layer4"][1].conv2.weight)


def test_coordinates_let_the_decoder_vary_flow_with_image_position():
    """On features that are the same everywhere, the decoder's flow is the same everywhere, unless
    it is given each pixel's position (task.coordinates): the ego-motion field needs that."""
    feats = [torch.ones(1, c, 64 // 2 ** (i + 1), 192 // 2 ** (i + 1)) for i, c in enumerate((8, 8, 8, 8, 8))]
    for coords in (False, True):
        torch.manual_seed(0)
        dec = FlowDecoder([8] * 5, scales=[0], coordinates=coords)
        for head in dec.unet.heads.values():
            torch.nn.init.normal_(head.weight)
        flow = dec(feats, feats, (64, 192))[0]
        assert flow.shape == (1, 2, 64, 192)
        assert (flow.amax((2, 3)) - flow.amin((2, 3)) > 1e-3).all() == coords


def test_one_adam_step_moves_every_scales_flow_alike():
    """Adam moves each head weight by about the lr: unscaled, the 128-channel coarsest head's
    flow moved ~8x as far per step as the 16-channel finest one's (and ran away in training)."""
    torch.manual_seed(0)
    num_ch = (8, 8, 16, 32, 64)
    feats = [torch.rand(2, c, 64 // 2 ** (i + 1), 96 // 2 ** (i + 1)) for i, c in enumerate(num_ch)]
    dec = FlowDecoder(num_ch)
    before = {s: f.detach() for s, f in dec.fractions(feats, feats).items()}
    opt = torch.optim.Adam(dec.parameters(), lr=1e-4)
    sum(f.mean() for f in dec.fractions(feats, feats).values()).backward()
    opt.step()
    moved = [(after - before[s]).abs().mean().item() for s, after in dec.fractions(feats, feats).items()]
    assert max(moved) < 2.5 * min(moved), moved
