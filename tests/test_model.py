import torch

from model_unet import SSPCAB, DraemModel, DiscriminativeSubNetwork, ReconstructiveSubNetwork, init_weights


def block_keys(name, cin, mid, cout):
    """Expected tensors of an official two-conv block (Sequential indices 0..5)."""
    keys = {}
    for conv, bn, a, b in ((0, 1, cin, mid), (3, 4, mid, cout)):
        keys[f"{name}.{conv}.weight"] = (b, a, 3, 3)
        keys[f"{name}.{conv}.bias"] = (b,)
        for t in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{bn}.{t}"] = (b,)
        keys[f"{name}.{bn}.num_batches_tracked"] = ()
    return keys


def up_keys(name, cin, cout):
    keys = {f"{name}.1.weight": (cout, cin, 3, 3), f"{name}.1.bias": (cout,), f"{name}.2.num_batches_tracked": ()}
    for t in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{name}.2.{t}"] = (cout,)
    return keys


def expected_reconstructive(w=128):
    k = {}
    for name, cin, cout in (("block1", 3, w), ("block2", w, 2 * w), ("block3", 2 * w, 4 * w),
                            ("block4", 4 * w, 8 * w), ("block5", 8 * w, 8 * w)):
        k |= block_keys(f"encoder.{name}", cin, cout, cout)
    for i, (c_up, c_mid, c_out) in enumerate(((8 * w, 8 * w, 4 * w), (4 * w, 4 * w, 2 * w),
                                              (2 * w, 2 * w, w), (w, w, w)), start=1):
        k |= up_keys(f"decoder.up{i}", c_up, c_up)
        k |= block_keys(f"decoder.db{i}", c_up, c_mid, c_out)
    k["decoder.fin_out.0.weight"] = (3, w, 3, 3)
    k["decoder.fin_out.0.bias"] = (3,)
    return k


def expected_discriminative(w=64):
    k = {}
    for name, cin, cout in (("block1", 6, w), ("block2", w, 2 * w), ("block3", 2 * w, 4 * w),
                            ("block4", 4 * w, 8 * w), ("block5", 8 * w, 8 * w), ("block6", 8 * w, 8 * w)):
        k |= block_keys(f"encoder_segment.{name}", cin, cout, cout)
    for up, db, c_in, c_out, c_skip in (("up_b", "db_b", 8 * w, 8 * w, 8 * w), ("up1", "db1", 8 * w, 4 * w, 8 * w),
                                        ("up2", "db2", 4 * w, 2 * w, 4 * w), ("up3", "db3", 2 * w, w, 2 * w),
                                        ("up4", "db4", w, w, w)):
        k |= up_keys(f"decoder_segment.{up}", c_in, c_out)
        k |= block_keys(f"decoder_segment.{db}", c_out + c_skip, c_out, c_out)
    k["decoder_segment.fin_out.0.weight"] = (2, w, 3, 3)
    k["decoder_segment.fin_out.0.bias"] = (2,)
    return k


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_default_state_dict_keys_and_shapes_match_official():
    assert shapes(ReconstructiveSubNetwork()) == expected_reconstructive()
    assert shapes(DiscriminativeSubNetwork()) == expected_discriminative()


def test_default_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert round(count(ReconstructiveSubNetwork()) / 1e6, 1) == 69.0
    assert round(count(DiscriminativeSubNetwork()) / 1e6, 1) == 28.4


def test_small_forward_backward_on_cpu():
    model = DraemModel(base_width=8, seg_base_width=4)
    x = torch.rand(2, 3, 64, 64)
    out = model(x)
    assert out.reconstruction.shape == (2, 3, 64, 64)
    assert out.logits.shape == (2, 2, 64, 64)
    (out.reconstruction.mean() + out.logits.mean()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    amap = model(x).anomaly_map
    assert amap.shape == (2, 64, 64) and ((amap >= 0) & (amap <= 1)).all()


def test_discriminator_sees_reconstruction_first():
    torch.manual_seed(0)
    model = DraemModel(base_width=8, seg_base_width=4).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        rec = model.reconstructive_subnetwork(x)
        first = model.discriminative_subnetwork(torch.cat((rec, x), 1))
        swapped = model.discriminative_subnetwork(torch.cat((x, rec), 1))
    torch.testing.assert_close(out.logits, first)
    assert not torch.allclose(out.logits, swapped)


def test_official_init_statistics():
    model = DraemModel(base_width=32, seg_base_width=16)
    init_weights(model)
    convs = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Conv2d)])
    bn_w = torch.cat([m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    bn_b = torch.cat([m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert abs(convs.mean()) < 1e-3 and abs(convs.std() - 0.02) < 1e-3
    assert abs(bn_w.mean() - 1) < 5e-3 and abs(bn_w.std() - 0.02) < 5e-3
    assert (bn_b == 0).all()


def test_sspcab_replaces_block5_and_exposes_its_input_and_output():
    model = DraemModel(base_width=8, seg_base_width=4, sspcab=True)
    assert isinstance(model.reconstructive_subnetwork.encoder.block5, SSPCAB)
    keys = model.reconstructive_subnetwork.state_dict().keys()
    assert "encoder.block5.masked_conv1.weight" in keys and "encoder.block5.attention_module.fc2.bias" in keys
    out = model(torch.rand(2, 3, 64, 64))
    assert out.block5_input.shape == out.block5_output.shape == (2, 64, 4, 4)
    # The same call twice gives the same tensors: nothing is carried over between calls.
    model.eval()
    x1, x2 = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    a = model(x1).block5_output
    model(x2)
    torch.testing.assert_close(model(x1).block5_output, a)


def test_sspcab_reads_only_the_four_corners_of_its_masked_kernel():
    torch.manual_seed(0)
    block = SSPCAB(16)
    with torch.no_grad():  # attention ~ 1 everywhere, so the output is the masked convolution alone
        block.attention_module.fc2.weight.zero_()
        block.attention_module.fc2.bias.fill_(50.0)
        x = torch.rand(1, 16, 12, 12)
        base = block(x)
        x2 = x.clone()
        x2[0, :, 6, 6] += 1.0
        changed = (block(x2) - base).abs().sum(1)[0] > 1e-6
    expected = torch.zeros(12, 12, dtype=torch.bool)
    for dy in (-2, 2):
        for dx in (-2, 2):
            expected[6 + dy, 6 + dx] = True
    assert torch.equal(changed, expected)
