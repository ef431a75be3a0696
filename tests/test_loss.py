import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from helpers import loss_on
from loss import FocalLoss, ssim_loss, ssim_map


def test_ssim_matches_scikit_image_on_the_interior():
    rng = np.random.default_rng(0)
    a = rng.random((3, 48, 40))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    ours = ssim_map(torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0].numpy()
    for c in range(3):
        _, ref = structural_similarity(a[c], b[c], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                       data_range=1.0, full=True)
        np.testing.assert_allclose(ours[c, 5:-5, 5:-5], ref[5:-5, 5:-5], atol=1e-6)


def test_ssim_of_identical_images_is_one():
    x = torch.rand(2, 3, 32, 32)
    assert torch.isclose(ssim_map(x, x).mean(), torch.tensor(1.0), atol=1e-6)
    assert ssim_loss(x, x).abs() < 1e-6
    assert ssim_loss(x, torch.rand(2, 3, 32, 32)) > 0.5


def test_focal_loss_matches_direct_formula_and_has_finite_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    mask = (torch.rand(2, 1, 8, 8) > 0.7).float()
    probs = torch.softmax(logits, 1)
    loss = FocalLoss()(probs, mask)
    p = probs.detach().numpy()
    m = mask[:, 0].numpy()
    t1 = np.clip(m, 1e-5, 1 - 1e-5)
    pt = t1 * p[:, 1] + (1 - t1) * p[:, 0] + 1e-5
    ref = np.mean(-((1 - pt) ** 2) * np.log(pt))
    assert abs(loss.item() - ref) < 1e-6
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_total_is_the_sum_of_its_parts_and_keeps_dtype():
    torch.manual_seed(0)
    rec, clean = torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, 3, 32, 32, dtype=torch.float64)
    logits, mask = torch.randn(2, 2, 32, 32, dtype=torch.float64), (torch.rand(2, 1, 32, 32) > 0.5).double()
    total, parts = loss_on(rec, clean, logits, mask)
    assert set(parts) == {"l2", "ssim", "focal"}
    assert total.dtype == torch.float64
    torch.testing.assert_close(total, sum(parts.values()))
    torch.testing.assert_close(parts["l2"], ((rec - clean) ** 2).mean())
    b_in, b_out = torch.rand(2, 8, 2, 2, dtype=torch.float64), torch.rand(2, 8, 2, 2, dtype=torch.float64)
    total, parts = loss_on(rec, clean, logits, mask, (b_in, b_out))
    torch.testing.assert_close(parts["sspcab"], 0.1 * ((b_in - b_out) ** 2).mean())
    torch.testing.assert_close(total, sum(parts.values()))


def test_the_image_score_loss_is_the_cross_entropy_of_the_evaluated_score_on_pixel_labelled_samples():
    g = torch.Generator().manual_seed(0)
    b, h = 5, 32
    rec, clean = torch.rand(b, 3, h, h, generator=g), torch.rand(b, 3, h, h, generator=g)
    logits = torch.randn(b, 2, h, h, generator=g, requires_grad=True)
    mask = torch.zeros(b, 1, h, h)
    mask[1, :, 4:9, 4:9] = mask[3, :, 20:30, 2:12] = mask[4, :, 0:3, 0:3] = 1  # 0 and 2 good; 4: image label only
    has_mask = torch.tensor([True, True, True, True, False])
    total, parts = loss_on(rec, clean, logits, mask, score_weight=0.5, real=2, has_mask=has_mask)
    plain_total, plain = loss_on(rec, clean, logits, mask, real=2, has_mask=has_mask)
    assert "image_score" not in plain
    scores = torch.nn.functional.avg_pool2d(torch.softmax(logits, 1)[:, 1:], 21, stride=1, padding=10).amax((1, 2, 3))
    s, y = scores[:4].detach().double().numpy(), np.array([0.0, 1.0, 0.0, 1.0])
    expected = -np.mean(y * np.log(s) + (1 - y) * np.log(1 - s))  # the four pixel-labelled samples
    assert parts["image_score"].item() == pytest.approx(0.5 * expected, rel=1e-5)
    torch.testing.assert_close(total, plain_total + parts["image_score"])
    parts["image_score"].backward()  # it lowers a good image's score and raises a defective one's
    assert logits.grad[0, 1].sum() > 0 > logits.grad[1, 1].sum()  # descent lowers the anomaly logit of 0 only
    assert logits.grad[4].abs().sum() == 0  # the image-level sample is image_label_loss's alone
