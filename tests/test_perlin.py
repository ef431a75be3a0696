import dataclasses
import math

import numpy as np
import pytest
import torch

from perlin import (AUGMENTERS, MAX_LOG_RES, RECIPES, anomaly_masks, augment_sources, perlin_noise, random_crops, rotate,
                    simulate_anomalies, uniform)


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


def test_mask_is_where_rotated_noise_exceeds_half():
    # Recompute the mask from the generator's own draws in the same order as simulate_anomalies makes them
    # when nothing else is drawn: a noise-source batch with no normal-image rotation and no anomaly-free samples.
    from perlin import Recipe
    recipe = Recipe(0.0, 0.8, rotate_p=0.0, rotate_degrees=0.0, anomaly_free_p=0.0)
    images = torch.zeros(4, 3, 64, 64, dtype=torch.uint8)
    batch = simulate_anomalies(images, None, recipe, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    torch.rand(4, generator=g)  # the rotation coins (no sample rotates, so no angle is drawn)
    mask, noise = anomaly_masks(4, 64, 64, g, "cpu")
    assert torch.equal(batch.mask, mask)
    assert torch.equal(mask, (noise > 0.5).float())
    # With the noise as source, the anomaly is grey levels noise * 0.5 + 0.25 blended in, at beta drawn next.
    beta = uniform((4,), 0.0, 0.8, g, "cpu")[:, None, None, None]
    expected = (1 - beta) * (noise * 0.5 + 0.25) * mask
    torch.testing.assert_close(batch.augmented, expected.expand(-1, 3, -1, -1))


def test_blend_of_a_real_image_and_its_source():
    """The paper's eq. 1: I_a = (1 - M) * I + (1 - beta) * (M * A) + beta * (M * I), on non-zero images, where
    dropping either image term changes the result."""
    from perlin import Recipe
    recipe = Recipe(0.2, 0.8, rotate_p=0.0, rotate_degrees=0.0, anomaly_free_p=0.0)
    images = torch.randint(30, 226, (6, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    batch = simulate_anomalies(images, None, recipe, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    torch.rand(6, generator=g)  # the rotation coins
    mask, noise = anomaly_masks(6, 48, 48, g, "cpu")
    beta = uniform((6,), 0.2, 0.8, g, "cpu").view(-1, 1, 1, 1)  # drawn next
    image, source = images.float() / 255, (noise * 0.5 + 0.25).expand(-1, 3, -1, -1)
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
    # beta: recovered from black images blended with the noise source, (1 - beta) * source inside the mask
    exact = dataclasses.replace(RECIPES[recipe], rotate_p=0.0, anomaly_free_p=0.0)
    batch = simulate_anomalies(torch.zeros(400, 3, 32, 32, dtype=torch.uint8), None, exact, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    torch.rand(400, generator=g)  # the rotation coins
    mask, noise = anomaly_masks(400, 32, 32, g, "cpu")
    beta = uniform((400,), exact.beta_low, exact.beta_high, g, "cpu")
    torch.testing.assert_close(batch.augmented, ((1 - beta.view(-1, 1, 1, 1)) * (noise * 0.5 + 0.25) * mask).expand(-1, 3, -1, -1))
    low, high = RECIPES[recipe].beta_low, RECIPES[recipe].beta_high
    assert beta.min() >= low and beta.max() <= high
    assert beta.min() < low + 0.05 and beta.max() > high - 0.05


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


def test_rotation_by_zero_is_identity_and_180_flips():
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(rotate(x, torch.zeros(2)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, torch.full((2,), 180.0)), x.flip(2, 3), atol=1e-4, rtol=0)


def test_whole_batch_and_subset_paths_agree():
    # The GPU path (whole batch + torch.where, no host sync) and the CPU path (selected samples only) must
    # give the same result for a deterministic augmenter.
    from perlin import apply_to_all_keep_selected, apply_to_selected, aug_equalize
    x = torch.rand(6, 3, 16, 16)
    selected = torch.tensor([True, False, True, True, False, False])
    fn = lambda s: aug_equalize(s, None, "cpu")
    whole = apply_to_all_keep_selected(selected, fn, x)
    subset = apply_to_selected(selected, fn, x)
    assert torch.equal(whole, subset)
    assert torch.equal(whole[~selected], x[~selected]) and not torch.equal(whole[selected], x[selected])


def test_hue_rotation_keeps_luminance_and_changes_colour():
    from perlin import rotate_hue, yiq_matrices
    x = 0.4 + 0.2 * torch.rand(4, 3, 8, 8)  # near grey: no clamping
    out = rotate_hue(x, torch.Generator().manual_seed(0), "cpu")
    to_yiq, _ = yiq_matrices(torch.device("cpu"), torch.float32)
    luma = lambda t: torch.einsum("j,njhw->nhw", to_yiq[0], t)
    torch.testing.assert_close(luma(out), luma(x), atol=1e-5, rtol=0)
    assert (out - x).abs().max() > 1e-3


def test_rotation_is_rigid_when_height_and_width_differ():
    image = torch.zeros(1, 1, 32, 96)
    image[0, 0, 4:8, 50:54] = 1.0  # a 4 x 4 square centred 10 rows above and 4 columns right of the centre
    turned = rotate(image, torch.tensor([90.0]), mode="nearest")[0, 0]
    rows, cols = (turned > 0.5).nonzero(as_tuple=True)
    assert len(rows) == 16 and rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3  # still a 4 x 4 square
    # Output pixel p samples the input at R(90) p, in pixels from the centre (15.5, 47.5): the square's centre
    # (-10, +4) (rows, columns) moves to (-4, -10), i.e. (11.5, 37.5). Rotating in [-1, 1] units instead would
    # stretch it by 96/32 and put it elsewhere.
    assert (rows.float().mean().item(), cols.float().mean().item()) == (11.5, 37.5)
    square = torch.rand(2, 3, 48, 48)
    torch.testing.assert_close(rotate(square, torch.zeros(2)), square, atol=1e-5, rtol=0)


def test_random_crops_are_windows_of_their_images_and_repeat_with_the_seed():
    images = torch.arange(4 * 3 * 40 * 70, dtype=torch.float32).view(4, 3, 40, 70)
    crops = random_crops(images, (32, 64), torch.Generator().manual_seed(1))
    assert crops.shape == (4, 3, 32, 64)
    for image, crop in zip(images, crops):
        top, left = divmod(int(crop[0, 0, 0].item() - image[0, 0, 0].item()), 70)
        assert torch.equal(crop, image[:, top:top + 32, left:left + 64])
    assert torch.equal(crops, random_crops(images, (32, 64), torch.Generator().manual_seed(1)))
    offsets = {int(c[0, 0, 0] - i[0, 0, 0]) for _ in range(20) for i, c in
               zip(images, random_crops(images, (32, 64), torch.Generator().manual_seed(_)))}
    assert len(offsets) > 10  # the windows move


def test_simulation_keeps_its_invariants_when_height_and_width_differ():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (400, 3, 32, 96), dtype=torch.uint8, generator=g)
    sources = torch.randint(0, 256, (7, 3, 32, 96), dtype=torch.uint8, generator=g)
    batch = simulate_anomalies(images, sources, "official", g)
    assert batch.augmented.shape == batch.image.shape == (400, 3, 32, 96) and batch.mask.shape == (400, 1, 32, 96)
    assert batch.augmented.min() >= 0 and batch.augmented.max() <= 1 and set(batch.mask.unique().tolist()) <= {0, 1}
    free = (batch.augmented == batch.image).flatten(1).all(1) & (batch.mask.flatten(1).sum(1) == 0)
    assert abs(free.float().mean().item() - 0.5) < 0.1
    masks, noise = anomaly_masks(64, 32, 96, torch.Generator().manual_seed(1), "cpu")
    assert masks.shape == (64, 1, 32, 96) and torch.equal(masks, (noise > 0.5).float())
    assert 0.01 < masks.mean() < 0.5  # Perlin blobs, not empty and not everywhere
