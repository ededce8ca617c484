"""The SqueezeDet-style head: anchors, decoding and the multi-task loss, on tiny images."""

import pytest
import torch

from squeezer.zoo import create
from squeezer.zoo.squeezedet import anchor_grid, anchor_shapes, box_iou, detection_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_anchor_grid_is_cell_major_with_k_shapes_per_cell():
    shapes = anchor_shapes(64)
    a = anchor_grid(64, (2, 2), shapes)
    assert a.shape == (2 * 2 * len(shapes), 4)
    assert torch.equal(a[: len(shapes), :2], torch.tensor([[16.0, 16.0]]).expand(len(shapes), 2))
    assert torch.equal(a[len(shapes), :2], torch.tensor([48.0, 16.0]))  # next cell along x
    # aspect ratio h / w of the shapes: 0.5, 1, 2 at every size
    r = shapes[:, 1] / shapes[:, 0]
    assert torch.allclose(r, torch.tensor([0.5, 1.0, 2.0]).repeat(3))


def test_box_iou_against_hand_computed_values():
    a = torch.tensor([[5.0, 5.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 5.0, 10.0, 10.0], [10.0, 5.0, 10.0, 10.0], [50.0, 50.0, 2.0, 2.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[1.0, 50 / 150, 0.0]]))


def test_decode_zero_deltas_returns_the_anchors():
    det = create("squeezedet", classes=2, image_size=64, width=0.5).eval()
    raw = torch.zeros(1, det.anchors_per_cell * 7, 2, 2)
    out = det.decode(raw)
    assert torch.allclose(out["boxes"][0], det.anchors(raw))
    assert torch.allclose(out["probs"], torch.full_like(out["probs"], 0.5))
    assert torch.allclose(out["confidence"], torch.full_like(out["confidence"], 0.5))


def test_detection_loss_trains_the_head_toward_a_box():
    det = create("squeezedet", classes=2, image_size=64, width=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g)
    boxes = [torch.tensor([[20.0, 24.0, 16.0, 12.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([1]), torch.zeros(0, dtype=torch.long)]
    opt = torch.optim.Adam(det.convdet.parameters(), lr=1e-2)
    det.eval()  # BatchNorm statistics fixed: only the ConvDet layer learns
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = detection_loss(det, det(x), boxes, labels)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
