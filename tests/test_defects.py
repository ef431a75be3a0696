"""Real defects in training, piece by piece: which files are drawn, how a split file is read, the loss on them,
and the draw each step makes."""
import pickle
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_loader import DataError
from helpers import loss_on, run_settings
from loss import FocalLoss, ssim_loss
from recipe import RECIPES
from training.defects import (RealDefects, draw_real, pixel_labelled, read_split_file, real_per_step,
                              stratified_order)


def files(counts: dict[str, int]) -> list[dict]:
    return [{"path": Path(f"{kind}/{i:03d}.png"), "defect_type": kind, "mask": Path(f"gt/{kind}/{i:03d}_mask.png")}
            for kind, n in counts.items() for i in range(n)]


def test_stratified_order_draws_each_type_in_proportion_and_smaller_draws_are_subsets():
    pool = files({"blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103})  # the magnetic tiles
    order = stratified_order(pool, torch.Generator().manual_seed(0))
    assert sorted(order, key=str) == sorted(pool, key=str)  # a permutation
    for n in (5, 16, 53, 200):
        drawn = [f["defect_type"] for f in order[:n]]
        for kind, count in {"blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}.items():
            assert abs(drawn.count(kind) - n * count / len(pool)) <= 1.0, (n, kind)
    again = stratified_order(pool, torch.Generator().manual_seed(0))
    other = stratified_order(pool, torch.Generator().manual_seed(1))
    assert again == order and other[:16] != order[:16]  # the seed decides the draw


def test_split_file_reads_names_and_flags_as_the_authors_write_them(tmp_path):
    path = tmp_path / "split_2.pyb"
    train = [(10000, False), (10001, True), (10002, False)]
    path.write_bytes(pickle.dumps((train, [(20000, False)])))
    assert read_split_file(path) == {"10000": False, "10001": True, "10002": False}
    path.write_bytes(pickle.dumps(({"not": "pairs"}, [])))
    with pytest.raises(DataError, match="expected \\(train, test\\) lists"):
        read_split_file(path)
    path.write_bytes(pickle.dumps(([(np.int64(10000), True)], [])))  # any class, numpy's included, is refused
    with pytest.raises(DataError, match="object, not only names"):
        read_split_file(path)


def test_pixel_labels_keep_masks_on_n_drawn_or_on_the_split_files_choice(tmp_path):
    pool = files({"defect": 6})
    drawn = pixel_labelled(pool, "2", [], torch.Generator().manual_seed(0))
    assert [d["path"] for d in drawn] == [d["path"] for d in pool] and sum(d["mask"] is not None for d in drawn) == 2
    assert pixel_labelled(pool, "all", [], torch.Generator()) == pool
    split = tmp_path / "split.pyb"
    split.write_bytes(pickle.dumps(([("001", True), ("004", True), ("002", False), ("good7", False)], [])))
    chosen = pixel_labelled(pool, str(split), [Path("good/good7.png")], torch.Generator())
    assert [d["path"].stem for d in chosen if d["mask"] is not None] == ["001", "004"]
    with pytest.raises(DataError, match="only 6 of the 6"):
        pixel_labelled(pool, "7", [], torch.Generator())


def test_real_defects_have_no_reconstruction_loss_and_the_image_label_loss_reads_the_image_score():
    g = torch.Generator().manual_seed(0)
    b, h = 6, 32
    rec, clean = torch.rand(b, 3, h, h, generator=g), torch.rand(b, 3, h, h, generator=g)
    logits = torch.randn(b, 2, h, h, generator=g)
    mask = (torch.rand(b, 1, h, h, generator=g) > 0.8).float()
    has_mask = torch.tensor([True, True, True, True, True, False])  # 4 simulated, 1 real with mask, 1 without
    total, parts = loss_on(rec, clean, logits, mask, real=2, has_mask=has_mask)
    probs = torch.softmax(logits, 1)
    assert parts["l2"] == pytest.approx(F.mse_loss(rec[:4], clean[:4]).item())
    assert parts["ssim"] == pytest.approx(ssim_loss(rec[:4], clean[:4]).item())
    # the real defect with a mask: its mask pixels weigh as much as the rest of it (the published focal loss on
    # each part), beside the four simulated samples' plain means
    inside = mask[4, 0].bool()

    def focal_on(pixels: torch.Tensor, label: float) -> torch.Tensor:
        return FocalLoss()(probs[4][:, pixels].reshape(1, 2, -1, 1), torch.full((1, 1, int(pixels.sum()), 1), label))
    balanced = 0.5 * (focal_on(inside, 1.0) + focal_on(~inside, 0.0))
    expected = (4 * FocalLoss()(probs[:4], mask[:4]) + balanced) / 5
    assert parts["focal"] == pytest.approx(expected.item(), rel=1e-5)
    score = F.avg_pool2d(probs[5:, 1:], 21, stride=1, padding=10).amax()  # the evaluation's image score
    assert parts["image_label"] == pytest.approx(-score.log().item(), rel=1e-6)
    assert total.item() == pytest.approx(sum(parts[k].item() for k in ("l2", "ssim", "focal", "image_label")))
    assert parts["real_defects"] == pytest.approx((balanced - score.log()).item(), rel=1e-5)
    # without real defects: the published loss, unchanged
    plain_total, plain = loss_on(rec, clean, logits, mask)
    assert set(plain) == {"l2", "ssim", "focal"}
    assert plain["focal"] == pytest.approx(FocalLoss()(probs, mask).item(), rel=1e-6)


def test_each_step_draws_real_defects_with_their_masks_moved_alike():
    images = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    masks = torch.zeros(3, 1, 32, 32, dtype=torch.uint8)
    for i in range(3):  # a bright square where the mask is
        images[i, :, 4 + i:12 + i, 6:14] = 255
        masks[i, :, 4 + i:12 + i, 6:14] = 1
    defects = RealDefects(images, masks, torch.tensor([True, True, False]),
                          [{"mask": "a.png"}, {"mask": "b.png"}, {"mask": None}])
    image, mask, has_mask = draw_real(defects, 64, RECIPES["official"], None, torch.Generator().manual_seed(0))
    assert image.shape == (64, 3, 32, 32) and mask.shape == (64, 1, 32, 32) and has_mask.dtype == torch.bool
    inside = image[:, 0][mask[:, 0].bool()]
    assert inside.numel() > 0 and (inside > 0.5).float().mean() > 0.95  # the mask still covers the square
    flipped = (mask[:, 0, :, 16:].sum((1, 2)) > mask[:, 0, :, :16].sum((1, 2))).sum()
    assert 10 < flipped < 54  # about half the draws were flipped left-right (or turned)
    assert real_per_step(0.25, 8) == 2 and real_per_step(0.01, 8) == 1 and real_per_step(0.99, 8) == 7


def write(path: Path, size: tuple[int, int] = (32, 32)) -> Path:
    import cv2
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full(size, 128, np.uint8))
    return path


def test_training_defects_come_from_train_type_folders_or_a_description_and_may_lack_masks(tmp_path):
    from data_loader import category_layout
    from training.defects import choose_defects
    part = tmp_path / "data" / "part"
    write(part / "train" / "good" / "g0.png")
    write(part / "train" / "scratch" / "s0.png")
    write(part / "train" / "scratch" / "s1.png")
    write(part / "ground_truth" / "scratch" / "s0_mask.png")
    write(part / "test" / "dent" / "d0.png")
    write(part / "ground_truth" / "dent" / "d0_mask.png")
    layout = category_layout(tmp_path / "data", "part")
    assert set(layout.train_defects) == {"scratch"} and set(layout.test) == {"dent"}
    chosen = choose_defects(layout, 0, "all", [part / "train" / "good" / "g0.png"], torch.Generator())
    assert [(d["path"].name, d["mask"] and d["mask"].name, origin) for d, origin in chosen] == [
        ("s0.png", "s0_mask.png", "train"), ("s1.png", None, "train")]  # s1: an image-level label
    with pytest.raises(DataError, match="--train_defects 1: that is every defect image"):  # none left to score
        choose_defects(layout, 1, "all", [], torch.Generator())
    # the same folders named in <category>.json
    (tmp_path / "data" / "other.json").write_text(
        '{"train": "part/train/good", "train_defect": ["part/train/scratch"], "train_masks": "part/ground_truth/scratch",'
        ' "test_defect": "part/test/dent", "masks": "part/ground_truth/dent"}')
    described = category_layout(tmp_path / "data", "other")
    assert described.train_defects == {"scratch": part / "train" / "scratch"}
    assert described.train_masks == {"scratch": part / "ground_truth" / "scratch"}
    # a training defect must not share a mask file with a test defect
    write(part / "train" / "dent" / "d0.png")
    with pytest.raises(DataError, match="share the mask"):
        choose_defects(category_layout(tmp_path / "data", "part"), 0, "all", [], torch.Generator())


def test_real_defect_draws_come_from_the_steps_own_stream_on_each_rank():
    from engine import epoch_order, step_batch
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    defects = RealDefects(torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g),
                          (torch.rand(5, 1, 32, 32, generator=g) < 0.3).to(torch.uint8), torch.ones(5, dtype=torch.bool),
                          [{"mask": "m.png"}] * 5)
    order = epoch_order(16, 8, 3, 0, torch.device("cpu"))
    for paste in (True, False):
        config = run_settings(category="c", bs=4, seed=3, defect_share=0.5, paste_defects=paste, processes=2)

        def batch(rank: int, step: int):  # rank of 2 processes under torchrun --ddp
            on_rank = Namespace(**config, ddp=True, rank=rank, world_size=2)
            return step_batch(images, order, step, None, on_rank, torch.Generator(), defects)
        first = batch(0, 1)
        assert (first.real, first.pasted) == ((0, 2) if paste else (2, 0)) and len(first.augmented) == 4
        assert torch.equal(first.augmented, batch(0, 1).augmented)  # a function of the step: resume draws the same
        assert not torch.equal(first.augmented[2:], batch(1, 1).augmented[2:])  # each rank its own draw
        assert not torch.equal(first.augmented[2:], batch(0, 2).augmented[2:])  # each step its own draw


def test_a_pasted_defect_lies_on_a_good_image_which_is_its_clean_target():
    """Pasting: inside the drawn mask the input is the defect's pixels, outside it the good image the batch
    drew, which is also the reconstruction target; image-level labels keep their own image."""
    from training.defects import pasted_per_step
    from engine import epoch_order, step_batch
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 100, (8, 3, 32, 32), dtype=torch.uint8, generator=g)  # good images: dark
    masks = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    masks[:3, :, 8:20, 10:24] = 1  # the fourth has none: zeros, as loaded
    files = [{"mask": "a.png"}, {"mask": "b.png"}, {"mask": "c.png"}, {"mask": None}]
    defect_images = (200 + 50 * masks).expand(-1, 3, -1, -1).contiguous()  # 1.25 times as bright as around it
    defects = RealDefects(defect_images, masks, torch.tensor([True, True, True, False]), files)
    config = Namespace(**run_settings(category="c", bs=8, seed=0, defect_share=0.5, recipe="official"), ddp=False)
    batch = step_batch(images, epoch_order(8, 8, 0, 0, torch.device("cpu")), 0, None, config, torch.Generator(),
                       defects)
    assert (batch.pasted, batch.real) == (3, 1)  # 4 real places: 3 of 4 defects have masks
    pasted = slice(4, 7)
    inside = batch.mask[pasted].bool().expand(-1, 3, -1, -1)
    assert inside.any(dim=(1, 2, 3)).all()
    # the defect's pixels, as much brighter than the good image around them as they were than their own
    ring = F.max_pool2d(batch.mask[pasted], 3, stride=1, padding=1) - batch.mask[pasted]
    around = (batch.image[pasted] * ring).sum((1, 2, 3)) / ring.sum((1, 2, 3)) / 3
    within = (batch.augmented[pasted] * batch.mask[pasted]).sum((1, 2, 3)) / batch.mask[pasted].sum((1, 2, 3)) / 3
    assert within / around == pytest.approx([1.25] * 3, rel=0.03)
    assert torch.equal(batch.augmented[pasted][~inside], batch.image[pasted][~inside])  # the good image elsewhere
    assert (batch.image[pasted] < 100 / 255 + 1e-6).all()  # the clean target is a good image, not the defect
    assert batch.has_mask.tolist() == [True] * 7 + [False]  # the image-level label last, on its own image
    assert torch.equal(batch.augmented[7], batch.image[7]) and batch.mask[7].sum() == 0
    assert [pasted_per_step(defects, real, True) for real in (1, 2, 4, 7)] == [1, 1, 3, 5]
    assert pasted_per_step(defects, 4, False) == 0


def test_a_pasted_defect_meets_its_new_surroundings_as_it_met_its_own():
    """Pasting scales the defect by the brightness of the good image around the mask over its own: a brighter copy
    of the good image pastes back as the good image (no step at the border), and a defect keeps its contrast."""
    from training.defects import paste
    g = torch.Generator().manual_seed(0)
    good = 0.1 + 0.4 * torch.rand(2, 3, 64, 64, generator=g)
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, :, 10:30, 20:40] = 1
    masks[1, :, 40:60, 5:50] = 1
    assert torch.allclose(paste(good * 1.8, masks, good), good, atol=1e-5)
    dented = good * 1.8 * (1 - 0.3 * masks)  # 30 % darker inside the mask than the part around it
    assert torch.allclose(paste(dented, masks, good), good * (1 - 0.3 * masks), atol=1e-5)
    assert torch.equal(paste(dented, masks, good) * (1 - masks), good * (1 - masks))


def test_a_pasted_defect_turns_and_flips_with_its_new_part():
    """The defect, its good image and its mask get one flip and turn: here every defect image is the good image
    itself, so a pasted sample must equal its clean target whatever was drawn; moved apart, they would differ."""
    from engine import epoch_order, step_batch
    g = torch.Generator().manual_seed(3)
    part = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=g)  # no symmetry: any move shows
    masks = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    for i in range(4):
        masks[i, :, 2 + 3 * i:10 + 3 * i, 3:9] = 1  # off centre: a flip or turn moves it
    defects = RealDefects(part.expand(4, -1, -1, -1).contiguous(), masks, torch.ones(4, dtype=torch.bool),
                          [{"mask": f"{i}.png"} for i in range(4)])
    config = Namespace(**run_settings(category="c", bs=8, seed=0, defect_share=0.5, recipe="official"), ddp=False)
    images, order = part.expand(8, -1, -1, -1), epoch_order(8, 8, 0, 0, torch.device("cpu"))
    moved = 0
    for step in range(8):
        batch = step_batch(images, order, step, None, config, torch.Generator(), defects)
        assert (batch.pasted, batch.real) == (4, 0)
        for clean, pasted, mask in zip(batch.image[4:], batch.augmented[4:], batch.mask[4:]):
            assert mask.sum() > 0 and torch.allclose(pasted, clean, atol=1e-5)
            if not any(torch.equal(mask, m.float()) for m in masks):  # the mask was moved: flipped or turned ...
                moved += 1
                assert not torch.allclose(clean, part[0].float() / 255)  # ... and the part with it
    assert moved >= 8  # about three in four draws move (a flip on each axis with p 0.5, a turn with p 0.3)


def test_paste_contrast_scales_a_defect_against_the_brightness_around_it():
    """--paste_contrast: a factor c turns a defect d on a part of level L into L + c (d - L) (a direct formula on a
    flat part), 1 leaves it as it was; and the flag reaches the step: a pasted copy of the part itself, which pastes
    back as the part without it, now differs from its clean target inside the mask (by c - 1 times its contrast)."""
    from engine import epoch_order, step_batch
    from training.defects import paste
    flat = torch.full((3, 3, 64, 64), 0.4)
    masks = torch.zeros(3, 1, 64, 64)
    masks[:, :, 20:40, 10:30] = 1
    dented = flat * 1.8 * (1 - 0.3 * masks)  # pastes as 0.28 inside the mask: 0.12 darker than the part
    factors = torch.tensor([0.5, 1.0, 1.5])
    inside = paste(dented, masks, flat, factors)[:, :, 30, 20]
    assert torch.allclose(inside, (0.4 - factors * 0.12)[:, None].expand(-1, 3), atol=1e-5)
    assert torch.allclose(paste(dented, masks, flat, torch.ones(3)), paste(dented, masks, flat), atol=1e-6)
    whole = torch.ones(1, 1, 64, 64)  # no ring around it: the defect's own mean is the level it keeps
    defect = 0.2 + 0.4 * (torch.arange(64.0) / 63).expand(1, 3, 64, 64)
    assert torch.allclose(paste(defect, whole, flat[:1], torch.tensor([0.5])), 0.4 + 0.5 * (defect - 0.4), atol=1e-5)
    g = torch.Generator().manual_seed(3)
    part = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=g)
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    mask[:, :, 8:20, 8:20] = 1
    defects = RealDefects(part.expand(2, -1, -1, -1).contiguous(), mask, torch.ones(2, dtype=torch.bool),
                          [{"mask": f"{i}.png"} for i in range(2)])
    images, order = part.expand(8, -1, -1, -1), epoch_order(8, 8, 0, 0, torch.device("cpu"))
    for spread, differs in ((0.0, False), (0.5, True)):
        config = Namespace(**run_settings(category="c", bs=8, seed=0, defect_share=0.5, recipe="official",
                                          paste_contrast=spread), ddp=False)
        batch = step_batch(images, order, 0, None, config, torch.Generator(), defects)
        gap = (batch.augmented[4:] - batch.image[4:]).abs() * batch.mask[4:]
        assert (gap.amax() > 0.01) == differs


def test_pasted_defects_take_the_published_loss_and_are_watched():
    g = torch.Generator().manual_seed(2)
    rec, clean = torch.rand(6, 3, 32, 32, generator=g), torch.rand(6, 3, 32, 32, generator=g)
    logits, mask = torch.randn(6, 2, 32, 32, generator=g), (torch.rand(6, 1, 32, 32, generator=g) > 0.8).float()
    total, parts = loss_on(rec, clean, logits, mask, pasted=2)
    plain_total, plain = loss_on(rec, clean, logits, mask)
    assert torch.equal(total, plain_total) and all(torch.equal(parts[k], plain[k]) for k in plain)
    assert parts["real_defects"] == pytest.approx(FocalLoss()(torch.softmax(logits[4:], 1), mask[4:]).item(), rel=1e-5)


def test_the_files_trained_on_travel_with_the_checkpoint_and_its_exports(tmp_path):
    from deploy.export import checkpoint_metadata
    from scoring.model_files import info_from_metadata
    from model_unet import DraemModel
    from training.checkpoint import load_checkpoint, save_training
    files = [{"path": "/d/mtd/test/crack/a.jpg", "defect_type": "crack", "digest": "ab" * 16, "mask": None,
              "origin": "test"}]
    path = tmp_path / "run.pt"
    save_training(path, DraemModel(4, 4), run_settings(category="mtd", image_size=(32, 32), base_width=4, seg_base_width=4),
                  {"trained_defects": files})
    info = load_checkpoint(path)[1]
    assert info.trained_defects == files and info.trained_digests == frozenset({"ab" * 16})
    exported = info_from_metadata(checkpoint_metadata(path), tmp_path / "run.onnx", "onnx")
    assert exported.trained_digests == info.trained_digests
