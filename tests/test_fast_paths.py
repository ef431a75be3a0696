"""The fast paths (channels_last, bf16 autocast, torch.compile) give the loss of the plain fp32 step."""
from contextlib import nullcontext

import pytest
import torch

from loss import draem_loss
from model_unet import DraemModel, DraemOutput, init_weights
from perlin import simulate_anomalies


def batch_and_model():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g)
    batch = simulate_anomalies(images, images.flip(0), "official", g)
    torch.manual_seed(0)
    model = DraemModel(8, 8)
    init_weights(model)
    return batch, model.train()


def loss_of(model, batch, memory_format=torch.contiguous_format, autocast=nullcontext()):
    model = model.to(memory_format=memory_format)
    with autocast:
        out = model(batch.augmented.contiguous(memory_format=memory_format))
    return draem_loss(DraemOutput(*(t.float() for t in out)), batch)[0]


def test_channels_last_gives_the_same_loss():
    batch, model = batch_and_model()
    reference = loss_of(model, batch)
    torch.testing.assert_close(loss_of(model, batch, torch.channels_last), reference, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_gives_the_same_loss_within_tolerance():
    batch, model = batch_and_model()
    reference = loss_of(model, batch)
    fast = loss_of(model, batch, torch.channels_last, torch.autocast("cpu", dtype=torch.bfloat16))
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, reference, rtol=2e-2, atol=0)


@pytest.mark.slow  # compiling takes about a minute on 2 cores
def test_compiled_model_gives_the_same_loss():
    batch, model = batch_and_model()
    reference = loss_of(model, batch)
    compiled = torch.compile(model)
    torch.testing.assert_close(loss_of(compiled, batch), reference, rtol=1e-5, atol=1e-6)
