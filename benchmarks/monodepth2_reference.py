"""An eager re-implementation of Monodepth2's monocular training step, for timing only.

Written from reading nianticlabs/monodepth2 (``trainer.py``, ``layers.py``, ``networks/``,
``datasets/mono_dataset.py``, ``datasets/kitti_dataset.py``) and doing what it does, the way it
does it, with its default options (``--pose_model_type separate_resnet``, ``--pose_model_input
pairs``, ``frame_ids 0 -1 1``, ``scales 0 1 2 3``, automasking on, SSIM on, v2 multi-scale):

* data: each item loads 3 JPEGs (t, t-1, t+1) at their released size with PIL, resizes each to
  the 4 scales in a chain with LANCZOS (``Image.ANTIALIAS``), colour-jitters every scale of every
  frame with one shared ``ColorJitter`` draw, ``ToTensor``s both, builds K / inv_K per scale;
* depth: ResNet encoder ``(x - 0.45) / 0.225`` + decoder of reflection-padded 3x3 convs with
  ELU, nearest 2x upsampling, sigmoid disparity at 4 scales;
* pose: a separate ResNet on the 6-channel pair, one forward per source frame, in temporal order;
* loss: per scale, disparity upsampled to full resolution, backproject / project with 4x4
  matrices, ``grid_sample(padding_mode="border")``, SSIM (3x3 avg-pool, reflection pad) + L1
  against the target for every warped AND every identity source (recomputed at every scale),
  1e-5 noise on the identity errors, per-pixel min, edge-aware smoothness at the scale's own
  resolution; Adam lr 1e-4.

Only what the training step needs is here (no validation, logging or checkpoints). This file is
our own code, not a copy; it is never imported by the trainer.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

NUM_SCALES = 4
FRAME_IDS = (0, -1, 1)
KITTI_K = np.array([[0.58, 0, 0.5, 0], [0, 1.92, 0.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)


# --------------------------------------------------------------------------- data


class KittiRawJpegs(torch.utils.data.Dataset):
    """Monodepth2's ``KITTIRAWDataset`` (training mode) over split-file lines
    ``<date>/<drive> <frame> <l|r>`` and ``image_0{2,3}/data/<frame:010d>.jpg`` files.
    ``frame_ids``: its ``--frame_ids`` plus ``"s"`` (the other camera) with ``--use_stereo``.
    ``full_res``: also what its ``preprocess`` does to the loaded full-resolution frames (scale -1:
    ``to_tensor`` and the colour jitter, then deleted in ``__getitem__``; off by default, as the
    step comparison of ``bench_vs_reference.py`` was measured)."""

    def __init__(self, root: str, lines: list[str], height: int, width: int,
                 frame_ids: tuple = FRAME_IDS, full_res: bool = False) -> None:
        self.root, self.lines, self.height, self.width = Path(root), lines, height, width
        self.frame_ids, self.full_res = tuple(frame_ids), full_res
        self.resize = {i: transforms.Resize((height // 2 ** i, width // 2 ** i),
                                            interpolation=InterpolationMode.LANCZOS)
                       for i in range(NUM_SCALES)}
        self.to_tensor = transforms.ToTensor()
        self.jitter = ((0.8, 1.2), (0.8, 1.2), (0.8, 1.2), (-0.1, 0.1))

    def __len__(self) -> int:
        return len(self.lines)

    def _color(self, folder: str, frame: int, side: str, flip: bool) -> Image.Image:
        path = self.root / folder / f"image_0{2 if side == 'l' else 3}" / "data" / f"{frame:010d}.jpg"
        with open(path, "rb") as f, Image.open(f) as img:
            img = img.convert("RGB")
        return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img

    def _color_aug(self, do_aug: bool):
        if not do_aug:
            return lambda x: x
        order, *factors = transforms.ColorJitter.get_params(*self.jitter)
        tf = transforms.functional
        fns = (tf.adjust_brightness, tf.adjust_contrast, tf.adjust_saturation, tf.adjust_hue)

        def aug(img: Image.Image) -> Image.Image:  # the four adjustments in the drawn order
            for i in order:
                img = fns[i](img, factors[i])
            return img
        return aug

    def __getitem__(self, index: int) -> dict:
        do_aug, do_flip = random.random() > 0.5, random.random() > 0.5
        folder, frame, side = self.lines[index].split()
        other = {"l": "r", "r": "l"}[side]
        raw = {i: self._color(folder, int(frame), other, do_flip) if i == "s" else
               self._color(folder, int(frame) + i, side, do_flip) for i in self.frame_ids}
        inputs = {}
        for scale in range(NUM_SCALES):
            K = KITTI_K.copy()
            K[0, :] *= self.width // 2 ** scale
            K[1, :] *= self.height // 2 ** scale
            inputs[("K", scale)] = torch.from_numpy(K)
            inputs[("inv_K", scale)] = torch.from_numpy(np.linalg.pinv(K))
        color_aug = self._color_aug(do_aug)
        for i in self.frame_ids:
            prev = raw[i]
            if self.full_res:  # computed, then deleted, as Monodepth2 does
                self.to_tensor(prev), self.to_tensor(color_aug(prev))
            for scale in range(NUM_SCALES):  # chained: scale s is resized from scale s - 1
                prev = self.resize[scale](prev)
                inputs[("color", i, scale)] = self.to_tensor(prev)
                inputs[("color_aug", i, scale)] = self.to_tensor(color_aug(prev))
        if "s" in self.frame_ids:  # its stereo_T: the baseline's sign follows the flip and the side
            stereo_T = np.eye(4, dtype=np.float32)
            stereo_T[0, 3] = (-1 if side == "l" else 1) * (-1 if do_flip else 1) * 0.1
            inputs["stereo_T"] = torch.from_numpy(stereo_T)
        return inputs


# --------------------------------------------------------------------------- networks


class ResnetEncoder(nn.Module):
    """torchvision ResNet-18; ``num_input_images`` stacks frames on conv1 (the pose encoder)."""

    def __init__(self, num_input_images: int = 1) -> None:
        super().__init__()
        self.num_ch_enc = np.array([64, 64, 128, 256, 512])
        self.encoder = torchvision.models.resnet18(weights=None)
        if num_input_images > 1:
            self.encoder.conv1 = nn.Conv2d(num_input_images * 3, 64, 7, 2, 3, bias=False)
            nn.init.kaiming_normal_(self.encoder.conv1.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        e = self.encoder
        feats = [e.relu(e.bn1(e.conv1((x - 0.45) / 0.225)))]
        feats.append(e.layer1(e.maxpool(feats[-1])))
        for layer in (e.layer2, e.layer3, e.layer4):
            feats.append(layer(feats[-1]))
        return feats


class Conv3x3(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pad = nn.ReflectionPad2d(1)
        self.conv = nn.Conv2d(int(cin), int(cout), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = Conv3x3(cin, cout)
        self.nonlin = nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.conv(x))


class DepthDecoder(nn.Module):
    def __init__(self, num_ch_enc, scales=range(4)) -> None:
        super().__init__()
        self.scales = list(scales)
        dec = [16, 32, 64, 128, 256]
        self.up0 = nn.ModuleDict()
        self.up1 = nn.ModuleDict()
        for i in range(4, -1, -1):
            self.up0[str(i)] = ConvBlock(num_ch_enc[-1] if i == 4 else dec[i + 1], dec[i])
            self.up1[str(i)] = ConvBlock(dec[i] + (num_ch_enc[i - 1] if i > 0 else 0), dec[i])
        self.disp = nn.ModuleDict({str(s): Conv3x3(dec[s], 1) for s in self.scales})

    def forward(self, feats: list[torch.Tensor]) -> dict:
        out, x = {}, feats[-1]
        for i in range(4, -1, -1):
            x = [F.interpolate(self.up0[str(i)](x), scale_factor=2, mode="nearest")]
            if i > 0:
                x.append(feats[i - 1])
            x = self.up1[str(i)](torch.cat(x, 1))
            if i in self.scales:
                out[("disp", i)] = torch.sigmoid(self.disp[str(i)](x))
        return out


class PoseDecoder(nn.Module):
    def __init__(self, num_ch_enc) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(int(num_ch_enc[-1]), 256, 1)
        self.pose = nn.ModuleList([nn.Conv2d(256, 256, 3, 1, 1), nn.Conv2d(256, 256, 3, 1, 1),
                                   nn.Conv2d(256, 12, 1)])

    def forward(self, feats: list[list[torch.Tensor]]):
        out = torch.cat([F.relu(self.squeeze(f[-1])) for f in feats], 1)
        for i, conv in enumerate(self.pose):
            out = conv(out)
            if i != 2:
                out = F.relu(out)
        out = 0.01 * out.mean(3).mean(2).view(-1, 2, 1, 6)
        return out[..., :3], out[..., 3:]


# --------------------------------------------------------------------------- layers


def disp_to_depth(disp: torch.Tensor, min_depth: float, max_depth: float) -> tuple[torch.Tensor, torch.Tensor]:
    min_disp, max_disp = 1 / max_depth, 1 / min_depth
    scaled = min_disp + (max_disp - min_disp) * disp
    return scaled, 1 / scaled


def rot_from_axisangle(vec: torch.Tensor) -> torch.Tensor:
    """(B, 1, 3) axis-angle -> (B, 4, 4), filled entry by entry as Monodepth2 does."""
    angle = torch.norm(vec, 2, 2, True)
    axis = vec / (angle + 1e-7)
    ca, sa = torch.cos(angle), torch.sin(angle)
    C = 1 - ca
    x, y, z = (axis[..., i].unsqueeze(1) for i in range(3))
    xs, ys, zs, xC, yC, zC = x * sa, y * sa, z * sa, x * C, y * C, z * C
    xyC, yzC, zxC = x * yC, y * zC, z * xC
    rot = torch.zeros((vec.shape[0], 4, 4), device=vec.device)
    entries = {(0, 0): x * xC + ca, (0, 1): xyC - zs, (0, 2): zxC + ys, (1, 0): xyC + zs,
               (1, 1): y * yC + ca, (1, 2): yzC - xs, (2, 0): zxC - ys, (2, 1): yzC + xs,
               (2, 2): z * zC + ca}
    for (r, c), v in entries.items():
        rot[:, r, c] = torch.squeeze(v)
    rot[:, 3, 3] = 1
    return rot


def transformation_from_parameters(axisangle: torch.Tensor, translation: torch.Tensor,
                                   invert: bool = False) -> torch.Tensor:
    R = rot_from_axisangle(axisangle)
    t = translation.clone()
    if invert:
        R = R.transpose(1, 2)
        t *= -1
    T = torch.zeros(t.shape[0], 4, 4, device=t.device)
    T[:, 0, 0] = T[:, 1, 1] = T[:, 2, 2] = T[:, 3, 3] = 1
    T[:, :3, 3, None] = t.contiguous().view(-1, 3, 1)
    return torch.matmul(R, T) if invert else torch.matmul(T, R)


class BackprojectDepth(nn.Module):
    def __init__(self, batch_size: int, height: int, width: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        u, v = np.meshgrid(range(width), range(height), indexing="xy")
        pix = torch.from_numpy(np.stack([u.reshape(-1), v.reshape(-1)], 0).astype(np.float32))
        self.ones = nn.Parameter(torch.ones(batch_size, 1, height * width), requires_grad=False)
        self.pix_coords = nn.Parameter(torch.cat([pix.unsqueeze(0).repeat(batch_size, 1, 1), self.ones], 1),
                                       requires_grad=False)

    def forward(self, depth: torch.Tensor, inv_K: torch.Tensor) -> torch.Tensor:
        cam = torch.matmul(inv_K[:, :3, :3], self.pix_coords)
        cam = depth.view(self.batch_size, 1, -1) * cam
        return torch.cat([cam, self.ones], 1)


class Project3D(nn.Module):
    def __init__(self, batch_size: int, height: int, width: int, eps: float = 1e-7) -> None:
        super().__init__()
        self.batch_size, self.height, self.width, self.eps = batch_size, height, width, eps

    def forward(self, points: torch.Tensor, K: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        P = torch.matmul(K, T)[:, :3, :]
        cam = torch.matmul(P, points)
        pix = cam[:, :2, :] / (cam[:, 2, :].unsqueeze(1) + self.eps)
        pix = pix.view(self.batch_size, 2, self.height, self.width).permute(0, 2, 3, 1)
        pix[..., 0] /= self.width - 1
        pix[..., 1] /= self.height - 1
        return (pix - 0.5) * 2


class SSIM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1)
        self.refl = nn.ReflectionPad2d(1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = self.refl(x), self.refl(y)
        mu_x, mu_y = self.pool(x), self.pool(y)
        sigma_x = self.pool(x ** 2) - mu_x ** 2
        sigma_y = self.pool(y ** 2) - mu_y ** 2
        sigma_xy = self.pool(x * y) - mu_x * mu_y
        n = (2 * mu_x * mu_y + 0.01 ** 2) * (2 * sigma_xy + 0.03 ** 2)
        d = (mu_x ** 2 + mu_y ** 2 + 0.01 ** 2) * (sigma_x + sigma_y + 0.03 ** 2)
        return torch.clamp((1 - n / d) / 2, 0, 1)


def get_smooth_loss(disp: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    grad_disp_x = torch.abs(disp[:, :, :, :-1] - disp[:, :, :, 1:])
    grad_disp_y = torch.abs(disp[:, :, :-1, :] - disp[:, :, 1:, :])
    grad_img_x = torch.mean(torch.abs(img[:, :, :, :-1] - img[:, :, :, 1:]), 1, keepdim=True)
    grad_img_y = torch.mean(torch.abs(img[:, :, :-1, :] - img[:, :, 1:, :]), 1, keepdim=True)
    grad_disp_x *= torch.exp(-grad_img_x)
    grad_disp_y *= torch.exp(-grad_img_y)
    return grad_disp_x.mean() + grad_disp_y.mean()


# --------------------------------------------------------------------------- training step


class Monodepth2Step:
    """Monodepth2's ``Trainer`` reduced to ``step(inputs)``: process_batch + zero_grad + backward
    + Adam step, with ``generate_images_pred`` and ``compute_losses`` as in its trainer.py."""

    def __init__(self, batch_size: int, height: int, width: int, lr: float = 1e-4,
                 min_depth: float = 0.1, max_depth: float = 100.0, smoothness: float = 1e-3) -> None:
        self.batch_size, self.height, self.width = batch_size, height, width
        self.min_depth, self.max_depth, self.smoothness = min_depth, max_depth, smoothness
        self.scales = list(range(NUM_SCALES))
        self.models = {"encoder": ResnetEncoder(), "pose_encoder": ResnetEncoder(2)}
        self.models["depth"] = DepthDecoder(self.models["encoder"].num_ch_enc, self.scales)
        self.models["pose"] = PoseDecoder(self.models["pose_encoder"].num_ch_enc)
        params = [p for m in self.models.values() for p in m.parameters()]
        self.optimizer = torch.optim.Adam(params, lr)
        self.ssim = SSIM()
        self.backproject = BackprojectDepth(batch_size, height, width)  # source_scale 0 (v2)
        self.project = Project3D(batch_size, height, width)
        for m in self.models.values():
            m.train()

    def predict_poses(self, inputs: dict) -> dict:
        outputs = {}
        pose_feats = {f: inputs[("color_aug", f, 0)] for f in FRAME_IDS}
        for f in FRAME_IDS[1:]:
            pair = [pose_feats[f], pose_feats[0]] if f < 0 else [pose_feats[0], pose_feats[f]]
            axisangle, translation = self.models["pose"]([self.models["pose_encoder"](torch.cat(pair, 1))])
            outputs[("cam_T_cam", 0, f)] = transformation_from_parameters(
                axisangle[:, 0], translation[:, 0], invert=f < 0)
        return outputs

    def generate_images_pred(self, inputs: dict, outputs: dict) -> None:
        for scale in self.scales:
            disp = F.interpolate(outputs[("disp", scale)], [self.height, self.width], mode="bilinear",
                                 align_corners=False)
            _, depth = disp_to_depth(disp, self.min_depth, self.max_depth)
            for f in FRAME_IDS[1:]:
                cam = self.backproject(depth, inputs[("inv_K", 0)])
                pix = self.project(cam, inputs[("K", 0)], outputs[("cam_T_cam", 0, f)])
                outputs[("color", f, scale)] = F.grid_sample(inputs[("color", f, 0)], pix,
                                                             padding_mode="border", align_corners=True)

    def reprojection(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        l1 = torch.abs(target - pred).mean(1, True)
        return 0.85 * self.ssim(pred, target).mean(1, True) + 0.15 * l1

    def compute_losses(self, inputs: dict, outputs: dict) -> torch.Tensor:
        total = 0
        target = inputs[("color", 0, 0)]
        for scale in self.scales:
            reproj = torch.cat([self.reprojection(outputs[("color", f, scale)], target)
                                for f in FRAME_IDS[1:]], 1)
            identity = torch.cat([self.reprojection(inputs[("color", f, 0)], target)
                                  for f in FRAME_IDS[1:]], 1)
            identity = identity + torch.randn(identity.shape) * 0.00001
            to_optimise, _ = torch.min(torch.cat((identity, reproj), 1), dim=1)
            loss = to_optimise.mean()
            disp = outputs[("disp", scale)]
            norm_disp = disp / (disp.mean(2, True).mean(3, True) + 1e-7)
            loss = loss + self.smoothness * get_smooth_loss(norm_disp, inputs[("color", 0, scale)]) / 2 ** scale
            total = total + loss
        return total / len(self.scales)

    def step(self, inputs: dict) -> float:
        """One optimizer step on a collated batch (as Monodepth2's run_epoch body); returns the loss."""
        features = self.models["encoder"](inputs[("color_aug", 0, 0)])
        outputs = self.models["depth"](features)
        outputs.update(self.predict_poses(inputs))
        self.generate_images_pred(inputs, outputs)
        loss = self.compute_losses(inputs, outputs)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())
