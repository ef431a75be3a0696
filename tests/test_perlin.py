import math

import numpy as np
import pytest
import torch

from perlin import (AUGMENTERS, MAX_LOG_RES, RECIPES, anomaly_masks, augment_sources, perlin_noise, random_crops, rotate,
                    simulate_anomalies)


def reference_perlin(res_y, res_x, angles, height, width):
    """Per-pixel Perlin noise with explicit loops: the textbook formula, independent of the batched code."""
    out = np.zeros((height, width))
    fade = lambda t: 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3
    for i in range(height):
        for j in range(width):
            py, px = i * res_y / height, j * res_x / width
            cy, cx = int(py), int(px)
            fy, fx = py - cy, px - cx
            dots = {}
            for dy in (0, 1):
                for dx in (0, 1):
                    a = angles[cy + dy, cx + dx]
                    dots[dy, dx] = math.cos(a) * (fy - dy) + math.sin(a) * (fx - dx)
            ty, tx = fade(fy), fade(fx)
            top = dots[0, 0] + ty * (dots[1, 0] - dots[0, 0])
            bottom = dots[0, 1] + ty * (dots[1, 1] - dots[0, 1])
            out[i, j] = math.sqrt(2) * (top + tx * (bottom - top))
    return out


def test_perlin_noise_matches_per_pixel_reference():
    height, width = 32, 24
    log_res = (torch.tensor([2, 0, 3]), torch.tensor([1, 3, 3]))
    noise = perlin_noise(3, height, width, torch.Generator().manual_seed(5), log_res=log_res)
    lattice = 2 ** MAX_LOG_RES + 1
    angles = 2 * math.pi * torch.rand(3, lattice, lattice, generator=torch.Generator().manual_seed(5))
    for b in range(3):
        ref = reference_perlin(2 ** log_res[0][b].item(), 2 ** log_res[1][b].item(), angles[b].double().numpy(),
                               height, width)
        np.testing.assert_allclose(noise[b].numpy(), ref, atol=1e-5)


def test_lattice_scale_varies_per_sample():
    noise = perlin_noise(64, 64, 64, torch.Generator().manual_seed(0))
    roughness = (noise.diff(dim=1).abs().mean((1, 2)) + noise.diff(dim=2).abs().mean((1, 2)))
    assert roughness.max() / roughness.min() > 8  # 2^0 .. 2^5 lattices differ by up to 32x in frequency


def small_batch(n=16, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    sources = torch.randint(0, 256, (5, 3, size, size), dtype=torch.uint8, generator=g)
    return images, sources


def test_mask_is_binary_and_only_masked_pixels_change():
    images, sources = small_batch(32)
    batch = simulate_anomalies(images, sources, "official", torch.Generator().manual_seed(1))
    assert set(batch.mask.unique().tolist()) <= {0.0, 1.0}
    outside = batch.mask.expand_as(batch.image) == 0
    assert torch.equal(batch.augmented[outside], batch.image[outside])
    inside = batch.mask.expand_as(batch.image) == 1
    assert (batch.augmented[inside] != batch.image[inside]).float().mean() > 0.9
    assert torch.equal(batch.label, (batch.mask.flatten(1).sum(1) > 0).float())


def test_mask_is_where_rotated_noise_exceeds_half():
    # Recompute the mask from the generator's own draws in the same order as simulate_anomalies makes them
    # when nothing else is drawn: a noise-source batch with no normal-image rotation and no anomaly-free samples.
    from perlin import Recipe, anomaly_masks
    recipe = Recipe(0.0, 0.8, rotate_p=0.0, rotate_degrees=0.0, anomaly_free_p=0.0)
    images = torch.zeros(4, 3, 64, 64, dtype=torch.uint8)
    batch = simulate_anomalies(images, None, recipe, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    torch.rand(4, generator=g)  # the rotation coins (no sample rotates, so no angle is drawn)
    mask, noise = anomaly_masks(4, 64, 64, g, "cpu")
    assert torch.equal(batch.mask, mask)
    assert torch.equal(mask, (noise > 0.5).float())
    # With the noise as source, the anomaly is grey levels noise * 0.5 + 0.25 blended in.
    beta = batch.beta[:, None, None, None]
    expected = (1 - beta) * (noise * 0.5 + 0.25) * mask
    torch.testing.assert_close(batch.augmented, expected.expand(-1, 3, -1, -1))


def test_blend_of_a_real_image_and_its_source():
    """The paper's eq. 1: I_a = (1 - M) * I + (1 - beta) * (M * A) + beta * (M * I), on non-zero images, where
    dropping either image term changes the result."""
    from perlin import Recipe, anomaly_masks
    recipe = Recipe(0.2, 0.8, rotate_p=0.0, rotate_degrees=0.0, anomaly_free_p=0.0)
    images = torch.randint(30, 226, (6, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    batch = simulate_anomalies(images, None, recipe, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    torch.rand(6, generator=g)  # the rotation coins
    mask, noise = anomaly_masks(6, 48, 48, g, "cpu")
    image, source, beta = images.float() / 255, (noise * 0.5 + 0.25).expand(-1, 3, -1, -1), batch.beta.view(-1, 1, 1, 1)
    assert 0.01 < mask.mean() < 0.6 and (beta >= 0.2).all()
    expected = (1 - mask) * image + (1 - beta) * (mask * source) + beta * (mask * image)
    torch.testing.assert_close(batch.augmented, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(batch.image, image)


@pytest.mark.parametrize("recipe", ["official", "paper"])
def test_anomaly_free_share_and_beta_range(recipe):
    images, sources = small_batch(400, 32)
    batch = simulate_anomalies(images, sources, recipe, torch.Generator().manual_seed(2))
    free = (batch.augmented == batch.image).flatten(1).all(1) & (batch.mask.flatten(1).sum(1) == 0)
    assert abs(free.float().mean().item() - 0.5) < 0.1
    low, high = RECIPES[recipe].beta_low, RECIPES[recipe].beta_high
    assert batch.beta.min() >= low and batch.beta.max() <= high
    assert batch.beta.min() < low + 0.05 and batch.beta.max() > high - 0.05


def test_same_seed_same_batch_and_other_seed_differs():
    images, sources = small_batch()
    a = simulate_anomalies(images, sources, "official", torch.Generator().manual_seed(7))
    b = simulate_anomalies(images, sources, "official", torch.Generator().manual_seed(7))
    c = simulate_anomalies(images, sources, "official", torch.Generator().manual_seed(8))
    assert torch.equal(a.augmented, b.augmented) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.augmented, c.augmented)


def test_three_distinct_augmenters_per_sample_and_valid_range():
    _, sources = small_batch()
    x = sources[torch.arange(16) % 5].float() / 255
    out, choice = augment_sources(x, torch.Generator().manual_seed(0))
    assert choice.shape == (16, 3)
    assert all(len(set(row.tolist())) == 3 for row in choice)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    low_contrast = 0.35 + 0.3 * torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    for augmenter in AUGMENTERS:
        y = augmenter(x, torch.Generator().manual_seed(1), "cpu")
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1, augmenter.__name__
        # some draws are mild (solarize applies to half the samples, sharpness may be near 1); none is the identity
        changed = (augmenter(low_contrast, torch.Generator().manual_seed(1), "cpu") - low_contrast).abs().mean()
        assert changed > 0.005, f"{augmenter.__name__} barely changes its input: mean |change| {changed:.4f}"


def test_augmenters_with_a_closed_form():
    from perlin import aug_invert, aug_posterize, aug_solarize
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(aug_invert(x, None, "cpu"), 1 - x)
    solarized = aug_solarize(x, torch.Generator().manual_seed(3), "cpu")
    assert torch.isclose(solarized, x).logical_or(torch.isclose(solarized, 1 - x)).all()
    flipped = torch.isclose(solarized, 1 - x) & ~torch.isclose(x, 1 - x)
    kept = torch.isclose(solarized, x) & ~torch.isclose(x, 1 - x)
    # per sample, a threshold: every inverted pixel lies above every kept one
    for s in range(8):
        if flipped[s].any() and kept[s].any():
            assert x[s][flipped[s]].min() >= x[s][kept[s]].max()
    quantized = (x * 255).round().long()
    posterized = (aug_posterize(x, torch.Generator().manual_seed(4), "cpu") * 255).round().long()
    kept_bits = []
    for s in range(8):  # each sample keeps the top b bits of every value, for one b in 1..8
        fits = [b for b in range(1, 9) if torch.equal(posterized[s], quantized[s] & ((255 << (8 - b)) & 255))]
        assert fits, f"sample {s} is not a posterization of its input"
        kept_bits.append(fits[0])
    assert min(kept_bits) < 8  # at least one sample really lost bits
