"""A SqueezeDet-style single-stage detector (Wu et al., "SqueezeDet: Unified, Small, Low Power Fully
Convolutional Neural Networks for Real-Time Object Detection for Autonomous Driving", CVPR-W 2017,
arXiv:1612.01051, Sec. 3).

A convolutional trunk (SqueezeNext or SqueezeNet, without its classifier) gives an H × W feature
map; the ConvDet layer, one 3 × 3 convolution, predicts for each of the K anchors of every cell C
class scores, one confidence and four box deltas (δx, δy, δw, δh). The network's output is that map
as it is, one tensor (N, K·(C + 5), H, W), so it quantizes, exports and runs integer-only like a
classifier; :meth:`SqueezeDet.decode` turns it into boxes: with anchor centre (x̂, ŷ) and size
(ŵ, ĥ), ``x = x̂ + ŵ·δx``, ``y = ŷ + ĥ·δy``, ``w = ŵ·exp(δw)``, ``h = ĥ·exp(δh)``.
:func:`detection_loss` is the paper's multi-task loss (Sec. 3.3): box regression and class
cross-entropy on the anchor that best overlaps each ground-truth box, and confidence regressed to
the IoU on those anchors and to 0 elsewhere.

The anchors here are 3 sizes × 3 aspect ratios relative to the image (the paper's 9 anchors were
k-means shapes of KITTI boxes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .squeezenet import SqueezeNet
from .squeezenext import SqueezeNext

TRUNKS = ("sqnxt23", "sqnxt23v5", "squeezenet1_0", "squeezenet1_1")


def anchor_shapes(image_size: int, sizes=(0.1, 0.25, 0.5), ratios=(0.5, 1.0, 2.0)) -> torch.Tensor:
    """(K, 2) anchor widths and heights in pixels: every size × aspect ratio (h / w)."""
    out = [(image_size * s / r**0.5, image_size * s * r**0.5) for s in sizes for r in ratios]
    return torch.tensor(out)


def anchor_grid(image_size: int, grid: tuple[int, int], shapes: torch.Tensor) -> torch.Tensor:
    """(H·W·K, 4) anchors as (cx, cy, w, h) in pixels, cell by cell (row-major), K per cell."""
    h, w = grid
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * image_size / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * image_size / w
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([cx, cy], -1).reshape(h * w, 1, 2).expand(-1, len(shapes), -1)
    sizes = shapes.reshape(1, -1, 2).expand(h * w, -1, -1)
    return torch.cat([centres, sizes], -1).reshape(-1, 4)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``a`` (M, 4) with every box of ``b`` (N, 4), both (cx, cy, w, h)."""

    def corners(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:, :2] - t[:, 2:] / 2, t[:, :2] + t[:, 2:] / 2], 1)

    ca, cb = corners(a), corners(b)
    lt = torch.maximum(ca[:, None, :2], cb[None, :, :2])
    rb = torch.minimum(ca[:, None, 2:], cb[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = a[:, 2:].prod(-1)[:, None] + b[:, 2:].prod(-1)[None, :] - inter
    return inter / union.clamp(min=1e-9)


class SqueezeDet(nn.Module):
    """Trunk features → ConvDet (3 × 3 conv to K·(classes + 5) channels)."""

    def __init__(
        self,
        classes: int = 3,
        image_size: int = 224,
        trunk: str = "sqnxt23",
        width: float = 1.0,
        in_channels: int = 3,
    ):
        super().__init__()
        if trunk not in TRUNKS:
            raise ValueError(f"trunk must be one of {TRUNKS}, got {trunk!r}")
        if trunk.startswith("sqnxt"):
            net = SqueezeNext(trunk.removeprefix("sqnxt"), width, 1, in_channels)
            self.trunk = nn.Sequential(net.stem, net.stages, net.head)
        else:
            net = SqueezeNet(trunk.removeprefix("squeezenet"), 1, in_channels)
            self.trunk = net.features
        self.classes, self.image_size = classes, image_size
        self.register_buffer("shapes", anchor_shapes(image_size), persistent=False)
        k = len(self.shapes)
        self.convdet = nn.Conv2d(net.out_channels, k * (classes + 5), 3, padding=1)
        nn.init.normal_(self.convdet.weight, 0.0, 0.001)
        nn.init.zeros_(self.convdet.bias)
        self.input_shape = (in_channels, image_size, image_size)

    @property
    def anchors_per_cell(self) -> int:
        return len(self.shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convdet(self.trunk(x))

    def split(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """The raw map as per-anchor tensors: ``logits`` (N, A, C), ``confidence`` logits (N, A)
        and ``deltas`` (N, A, 4), with A = H·W·K anchors in :func:`anchor_grid`'s order."""
        n, _, h, w = raw.shape
        k, c = self.anchors_per_cell, self.classes
        per = raw.reshape(n, k, c + 5, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * k, c + 5)
        return {"logits": per[..., :c], "confidence": per[..., c], "deltas": per[..., c + 1 :]}

    def anchors(self, raw: torch.Tensor) -> torch.Tensor:
        """(A, 4) anchors (cx, cy, w, h) in pixels for a raw map of ``raw``'s grid."""
        return anchor_grid(self.image_size, tuple(raw.shape[-2:]), self.shapes.cpu())

    @torch.no_grad()
    def decode(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Boxes (N, A, 4) as (cx, cy, w, h) in pixels, class probabilities (N, A, C) and
        confidences (N, A) in [0, 1]; score a detection by confidence × class probability.

        Example:
            >>> det = SqueezeDet(classes=2, image_size=64)
            >>> out = det.decode(det.eval()(torch.zeros(1, 3, 64, 64)))
            >>> out["boxes"].shape, out["probs"].shape
            (torch.Size([1, 36, 4]), torch.Size([1, 36, 2]))
        """
        parts = self.split(raw)
        a = self.anchors(raw).to(raw.device)
        d = parts["deltas"]
        xy = a[:, :2] + a[:, 2:] * d[..., :2]
        wh = a[:, 2:] * torch.exp(d[..., 2:].clamp(max=4.0))
        return {
            "boxes": torch.cat([xy, wh], -1),
            "probs": parts["logits"].softmax(-1),
            "confidence": torch.sigmoid(parts["confidence"]),
        }


def detection_loss(
    model: SqueezeDet, raw: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor]
) -> torch.Tensor:
    """SqueezeDet's multi-task loss for a batch: per image, ``boxes[i]`` (M, 4) ground truth as
    (cx, cy, w, h) pixels and ``labels[i]`` (M,) class indices. Each box is assigned the anchor it
    overlaps most; that anchor's deltas regress to the box's (L2), its class logits take cross-
    entropy, and its confidence regresses to the IoU of its predicted box, while every other
    anchor's confidence is pushed to 0 (weighted by 1 / the number of anchors, as in the paper)."""
    parts = model.split(raw)
    anchors = model.anchors(raw).to(raw.device)
    conf = torch.sigmoid(parts["confidence"])
    total = raw.new_zeros(())
    for i, (gt, lab) in enumerate(zip(boxes, labels, strict=True)):
        if len(gt) == 0:
            total = total + (conf[i] ** 2).mean()
            continue
        best = box_iou(gt, anchors).argmax(1)  # (M,) the anchor of each box
        a = anchors[best]
        target = torch.cat([(gt[:, :2] - a[:, :2]) / a[:, 2:], torch.log(gt[:, 2:] / a[:, 2:])], 1)
        d = parts["deltas"][i, best]
        box_loss = ((d - target) ** 2).sum(1).mean()
        cls_loss = F.cross_entropy(parts["logits"][i, best], lab)
        with torch.no_grad():
            pred = torch.cat([a[:, :2] + a[:, 2:] * d[:, :2], a[:, 2:] * torch.exp(d[:, 2:])], 1)
            iou = box_iou(pred, gt).diagonal()
        mask = torch.ones_like(conf[i], dtype=torch.bool)
        mask[best] = False
        conf_loss = ((conf[i, best] - iou) ** 2).mean() + (conf[i][mask] ** 2).mean()
        total = total + box_loss + cls_loss + conf_loss
    return total / len(boxes)


@register_model(
    "squeezedet",
    data="images with boxes (3x224x224); detection_loss trains it",
    input_shape=(3, 224, 224),
    description="SqueezeDet-style detector: SqNxt-23 trunk + ConvDet (9 anchors/cell, 3 classes)",
)
def squeezedet(
    classes: int = 3,
    image_size: int = 224,
    trunk: str = "sqnxt23",
    width: float = 1.0,
    in_channels: int = 3,
) -> nn.Module:
    return SqueezeDet(classes, image_size, trunk, width, in_channels)
