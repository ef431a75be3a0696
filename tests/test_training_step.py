"""The project's real training step (engine.train_step) against a step written out by hand in float64:
fp32, channels_last, the SSPCAB term, and fp16 autocast with a GradScaler that really scales and skips."""
import copy
import dataclasses
from contextlib import nullcontext

import pytest
import torch

from engine import train_step
from loss import draem_loss
from model_unet import DraemModel, init_weights
from perlin import simulate_anomalies


def model_and_batch(sspcab=True):
    torch.manual_seed(0)
    model = DraemModel(4, 4, sspcab=sspcab)
    init_weights(model)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    sources = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    return model.train(), simulate_anomalies(images, sources, "official", g)


# Plain SGD in both steps: an update is lr x gradient, so parameters compare at tight tolerances (Adam's first
# step divides each gradient by its own size, which turns the rounding noise of near-zero gradients, such as
# those of conv biases before a BatchNorm, into full-size updates).
LR = 0.1


def hand_written_step(model, batch, lr=LR):
    """Forward, the four losses summed as the paper says, backward, one SGD step: nothing shared with train_step.

    In float64 (model and batch converted in place of the caller's copy): a float32 reference is itself only as
    exact as the CPU's convolution kernels, and on some CPUs (AVX2 without AVX-512) oneDNN's NCHW float32 kernels
    differ from float64 by about a tenth of an update."""
    model.double()
    batch = dataclasses.replace(batch, **{name: getattr(batch, name).double() for name in ("image", "augmented", "mask")})
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    out = model(batch.augmented)
    total, _ = draem_loss(out, batch, sspcab=True)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    model.float()
    return total.detach().float()


def run_train_step(model, batch, memory_format=torch.contiguous_format, autocast=nullcontext(), scaler=None, lr=LR):
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    _, total, parts = train_step(model, batch, optimizer, scaler, autocast, sspcab=True)
    return total.detach(), parts, scaler


def assert_same_parameters(a, b, atol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fp32_step_equals_a_hand_written_step_with_the_sspcab_term(memory_format):
    model, batch = model_and_batch()
    reference = copy.deepcopy(model)
    expected = hand_written_step(reference, batch)
    total, parts, _ = run_train_step(model, batch, memory_format=memory_format)
    assert "sspcab" in parts and parts["sspcab"] > 0
    torch.testing.assert_close(total, expected, atol=1e-5, rtol=0)
    # Updates are about 5e-3; the float32 step differs from the float64 one by rounding only (train-mode
    # BatchNorm on 4 samples amplifies it): up to 8.5e-5 on one thread (pytest -n 2), less on two.
    assert_same_parameters(model, reference, atol=1e-4)


def test_fp16_step_uses_the_grad_scaler():
    model, batch = model_and_batch()
    reference = copy.deepcopy(model)
    expected = hand_written_step(reference, batch)
    fp16 = torch.autocast("cpu", dtype=torch.float16)
    total, _, scaler = run_train_step(model, batch, autocast=fp16, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    assert abs(total.item() - expected.item()) < 0.02 * expected.item()
    assert scaler.get_scale() == 2.0 ** 8  # finite scaled gradients: the step was taken, the scale kept
    # The update (lr x gradient) points the way the fp32 one does (cosine 0.97 on one thread, as under pytest -n 2;
    # about 0.99 on two).
    start = model_and_batch()[0]
    update = torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), start.parameters())])
    expected_update = torch.cat([(p - q).flatten() for p, q in zip(reference.parameters(), start.parameters())])
    assert torch.nn.functional.cosine_similarity(update, expected_update, dim=0) > 0.95
    # A scale that overflows fp16 gradients: the scaler must skip the step (weights unchanged) and lower the scale.
    model, batch = model_and_batch()
    untouched = copy.deepcopy(model)
    _, _, scaler = run_train_step(model, batch, autocast=fp16, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 60))
    assert scaler.get_scale() < 2.0 ** 60
    assert_same_parameters(model, untouched, atol=0)
