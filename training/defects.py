"""A few real defects in training (docs/training.md, "Real defects"): which defect images a run learns from,
which of them keep their pixel labels, their tensors on the device, and the draw each step makes of them.

Where they come from, one list for all three: the category's own training defects (<category>/train/<type>/, masks
in ground_truth/<type>/), N of the test set's defects moved into training (--train_defects, stratified by type), and
which of them carry pixel labels (--pixel_labels: all, N drawn, or KolektorSDD2's published split file). A defect
without a mask is an image-level label. The checkpoint records every file (path, type, digest of its bytes), and
every evaluation of it leaves those files out (data_loader.load_test_set).
"""
import pickle
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data_loader import (DataError, Layout, Size, decode, defect_files, default_workers, file_digest,
                         height_width, parallel_read, resize)
from perlin import apply_where, random_crops, rotate, uniform
from recipe import Recipe


@dataclass
class RealDefects:
    """The real defects a run trains on, cached on the training device."""
    images: Tensor  # (N, 3, H, W) uint8 BGR
    masks: Tensor  # (N, 1, H, W) uint8 {0, 1}; zeros where there is no mask
    has_mask: Tensor  # (N,) bool: pixel labels known; else an image-level label only
    files: list[dict]  # what the checkpoint records: path, defect_type, digest, mask (None: image-level), origin
    pools: dict[bool, Tensor] = field(init=False, repr=False)  # indices of those with (True) and without a mask

    def __post_init__(self) -> None:
        # built once, on the defects' device: a step draws from them without a host-to-device copy
        self.pools = {known: torch.tensor([i for i, f in enumerate(self.files) if (f["mask"] is not None) == known],
                                          dtype=torch.long, device=self.images.device) for known in (True, False)}

    def __len__(self) -> int:
        return len(self.files)

    @property
    def digests(self) -> frozenset[str]:
        """The files' digests: what every evaluation of the model leaves out."""
        return frozenset(f["digest"] for f in self.files)

    def to(self, device: torch.device) -> "RealDefects":
        return RealDefects(self.images.to(device), self.masks.to(device), self.has_mask.to(device), self.files)

    def describe(self) -> str:
        masked = sum(f["mask"] is not None for f in self.files)
        moved = sum(f["origin"] == "test" for f in self.files)
        return (f"{len(self)} real defect image(s) ({masked} with masks, {len(self) - masked} image-level labels"
                + (f"; {moved} moved from the test set" if moved else "") + ")")


# ---- which files ----------------------------------------------------------------------------------------

def stratified_order(files: list[dict], generator: torch.Generator) -> list[dict]:
    """The files in a random order whose every prefix holds each defect type in proportion to its count: the
    i-th of a type's n files (in a random permutation) sits at (i + u) / n, u uniform. So the first N are a
    stratified draw, and a smaller N draws a subset of a larger one (the N-defect curve compares nested sets)."""
    by_type: dict[str, list[dict]] = {}
    for f in files:
        by_type.setdefault(f["defect_type"], []).append(f)
    keyed = []
    for kind in sorted(by_type):
        members = by_type[kind]
        permutation = torch.randperm(len(members), generator=generator).tolist()
        offsets = torch.rand(len(members), generator=generator).tolist()
        keyed += [((rank + offsets[rank]) / len(members), kind, members[i]) for rank, i in enumerate(permutation)]
    return [f for _, _, f in sorted(keyed, key=lambda k: (k[0], k[1]))]


def test_defects(layout: Layout) -> list[dict]:
    return defect_files({t: d for t, d in layout.test.items() if t != "good"}, layout.masks)


def moved_from_test(layout: Layout, count: int, generator: torch.Generator) -> list[dict]:
    """--train_defects N: N of the test set's defect images, stratified by type, drawn by the run's seed."""
    if count == 0:
        return []
    available = test_defects(layout)
    if count > len(available):
        raise DataError(f"--train_defects {count}: the test set of {layout.origin} has {len(available)} defect "
                        f"image(s); at least one must stay to score on")
    if count == len(available):
        raise DataError(f"--train_defects {count}: that is every defect image of the test set of {layout.origin}; "
                        f"leave at least one to score on")
    return stratified_order(available, generator)[:count]


def read_split_file(path: Path) -> dict[str, bool]:
    """KolektorSDD2's split_N.pyb (vicoslab/mixed-segdec-net-comind2021): a pickle of (train, test) lists of
    (image name, is_segmented) pairs. Read so that it can build nothing but those values: any object class in
    the file is refused before it is made. Returns {training image name: whether it carries pixel labels}."""

    class NamesOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            raise DataError(f"--pixel_labels {path}: the file holds a {module}.{name} object, not only names; "
                            f"refused (a split file is two lists of (image name, is_segmented) pairs)")

    try:
        with open(path, "rb") as f:
            split = NamesOnly(f).load()
    except DataError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as exc:
        raise DataError(f"--pixel_labels {path}: not a readable split file ({type(exc).__name__})")
    pairs = split[0] if isinstance(split, (tuple, list)) and len(split) == 2 else None
    if not isinstance(pairs, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], (int, str)) and isinstance(p[1], bool)
            for p in pairs):
        raise DataError(f"--pixel_labels {path}: expected (train, test) lists of (image name, is_segmented) pairs, "
                        f"as in KolektorSDD2's split_N.pyb")
    return {str(name): segmented for name, segmented in pairs}


def pixel_labelled(defects: list[dict], pixel_labels: str, train_good: list[Path],
                   generator: torch.Generator) -> list[dict]:
    """--pixel_labels: the defects with the masks they keep; the others become image-level labels.
    all: every mask found; N: N of those with masks (stratified, drawn by the seed); a split file: the ones it
    marks is_segmented (every training image it names must exist)."""
    with_mask = [d for d in defects if d["mask"] is not None]
    if pixel_labels == "all":
        return defects
    if pixel_labels.isdigit():
        count = int(pixel_labels)
        if count > len(with_mask):
            raise DataError(f"--pixel_labels {count}: only {len(with_mask)} of the {len(defects)} training defect "
                            f"images have masks")
        keep = {d["path"] for d in stratified_order(with_mask, generator)[:count]}
        return [d if d["path"] in keep else d | {"mask": None} for d in defects]
    path = Path(pixel_labels)
    if not path.is_file():
        raise DataError(f"--pixel_labels {pixel_labels}: expected all, a number, or a split file (.pyb) that exists")
    split = read_split_file(path)
    known = {p.stem for p in train_good} | {d["path"].stem for d in defects}
    missing = sorted(set(split) - known)
    if missing:
        raise DataError(f"--pixel_labels {path}: names {len(missing)} training image(s) that are not in the "
                        f"training folders (first: {', '.join(missing[:3])})")
    unmasked = [d["path"] for d in defects if split.get(d["path"].stem) and d["mask"] is None]
    if unmasked:
        raise DataError(f"--pixel_labels {path}: marks {unmasked[0]} as pixel-labelled, but it has no mask")
    return [d if split.get(d["path"].stem) else d | {"mask": None} for d in defects]


def check_distinct_masks(train: list[dict], layout: Layout) -> None:
    """A training defect and a test defect must not share a mask file (the same stem in one ground_truth folder)."""
    test_masks = {d["mask"]: d["path"] for d in test_defects(layout) if d["mask"] is not None}
    for d in train:
        if d["mask"] in test_masks:
            raise DataError(f"{d['path']} and {test_masks[d['mask']]} share the mask {d['mask']}: give the "
                            f"training defect another file name")


def choose_defects(layout: Layout, moved: int, pixel_labels: str, train_good: list[Path],
                   generator: torch.Generator) -> list[tuple[str]]:
    """Every real defect the run trains on, with where it came from ("train" or "test")."""
    own = defect_files(layout.train_defects, layout.train_masks)
    check_distinct_masks(own, layout)
    chosen = [(d, "train") for d in own] + [(d, "test") for d in moved_from_test(layout, moved, generator)]
    if pixel_labels != "all" and not chosen:
        raise DataError(f"--pixel_labels {pixel_labels}: {layout.origin} has no training defects (train/<type>/ or "
                        f"--train_defects N)")
    labelled = pixel_labelled([d for d, _ in chosen], pixel_labels, train_good, generator)
    return [(d, origin) for d, (_, origin) in zip(labelled, chosen)]


# ---- their tensors -----------------------------------------------------------------------------------------

def read_defect(item: dict, size: Size, bit_depth: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A training defect at size and its mask, binarised at 128 (None without one); a mask of another size than
    its image is refused: in training a misplaced mask teaches the wrong pixels."""
    image = decode(item["path"], bit_depth)
    if item["mask"] is None:
        return resize(image, size), None
    mask = cv2.imread(str(item["mask"]), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DataError(f"cannot decode mask {item['mask']}")
    if mask.shape != image.shape[:2]:
        raise DataError(f"mask {item['mask']} is {mask.shape[1]}x{mask.shape[0]}, its image {item['path']} "
                        f"{image.shape[1]}x{image.shape[0]}: a training mask must match its image")
    return resize(image, size), (resize(mask, size) >= 128).astype(np.uint8)


def load_real_defects(chosen: list[tuple[str]], size: Size, bit_depth: int,
                      workers: int | None = None) -> RealDefects | None:
    """The chosen defects decoded at size (None when there are none)."""
    if not chosen:
        return None
    read = parallel_read(partial(read_defect, bit_depth=bit_depth), [d for d, _ in chosen], size,
                         workers or default_workers())
    h, w = height_width(size)
    images = torch.from_numpy(np.stack([image for image, _ in read])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([np.zeros((h, w), np.uint8) if m is None else m for _, m in read]))[:, None]
    has_mask = torch.tensor([m is not None for _, m in read])
    files = [{"path": str(d["path"]), "defect_type": d["defect_type"], "digest": file_digest(d["path"]),
              "mask": None if d["mask"] is None else str(d["mask"]), "origin": origin} for d, origin in chosen]
    return RealDefects(images, masks, has_mask, files)


def real_per_step(share: float, batch_size: int) -> int:
    """How many of a batch's samples are real defects: share of it, at least one, leaving one simulated."""
    return min(batch_size - 1, max(1, round(share * batch_size)))


def pasted_per_step(defects: RealDefects, real: int, paste: bool) -> int:
    """How many of a step's real samples are pasted onto good images: when pasting, the defects with masks, in
    proportion to how many have one, at least one place for each kind that exists (with a single real place, the
    masked ones take it); the rest train on their own image (image-level labels)."""
    masked, unmasked = len(defects.pools[True]), len(defects.pools[False])
    if not paste or not masked:
        return 0
    return min(max(1, round(real * masked / len(defects))), real - 1 if unmasked and real > 1 else real)


def augment_alike(x: Tensor, recipe: Recipe, crop: tuple[int, int] | None, generator: torch.Generator) -> Tensor:
    """Each sample of x (k, C, H, W) cropped when the run crops, flipped on each axis with p 0.5 and turned as the
    recipe turns normal images: one move for all its channels (image, mask, clean target), so they stay aligned."""
    count, device = len(x), x.device
    if crop:
        x = random_crops(x, crop, generator)
    for axis in (-1, -2):
        x = torch.where((torch.rand(count, generator=generator, device=device) < 0.5)[:, None, None, None],
                        x.flip(axis), x)
    turn = torch.rand(count, generator=generator, device=device) < recipe.rotate_p
    degrees = recipe.rotate_degrees
    return apply_where(turn, lambda t: rotate(t, uniform((t.shape[0],), -degrees, degrees, generator, device)), x)


def pick(defects: RealDefects, count: int, generator: torch.Generator, among: Tensor | None = None) -> Tensor:
    """count indices of defects (from the indices among, default all), uniformly with replacement."""
    pool = torch.arange(len(defects), device=defects.images.device) if among is None else among
    return pool[torch.randint(0, len(pool), (count,), generator=generator, device=pool.device)]


def draw_real(defects: RealDefects, count: int, recipe: Recipe, crop: tuple[int, int] | None,
              generator: torch.Generator, among: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """count real defects for one step, trained on their own image (augment_alike, masks moved alike): (images
    (k, 3, H, W) float in [0, 1], masks (k, 1, H, W) {0, 1}, has_mask (k,))."""
    index = pick(defects, count, generator, among)
    x = augment_alike(torch.cat((defects.images[index].float() / 255, defects.masks[index].float()), dim=1),
                      recipe, crop, generator)
    return x[:, :3], (x[:, 3:] >= 0.5).float(), defects.has_mask[index]


def draw_pasted(defects: RealDefects, good: Tensor, recipe: Recipe, crop: tuple[int, int] | None,
                generator: torch.Generator, contrast: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """One defect with a mask pasted at its own place onto each good image (k, 3, H, W, uint8 as cached), then the
    good image (the clean target), the pasted image and the mask moved alike (augment_alike). Moving the defect
    apart from its new part would turn its texture against the part's (the tiles' grooves run one way), a seam
    no real defect has. contrast > 0: each defect's contrast scaled by a factor drawn in [1 - contrast,
    1 + contrast] (paste): (clean (k, 3, h, w), pasted (k, 3, h, w), masks (k, 1, h, w) {0, 1})."""
    index = pick(defects, len(good), generator, defects.pools[True])
    clean, mask = good.float() / 255, defects.masks[index].float()
    spread = uniform((len(good),), 1 - contrast, 1 + contrast, generator, good.device) if contrast else None
    pasted = paste(defects.images[index].float() / 255, mask, clean, spread)
    x = augment_alike(torch.cat((clean, pasted, mask), dim=1), recipe, crop, generator)
    return x[:, :3], x[:, 3:6], (x[:, 6:] >= 0.5).float()


def paste(defects: Tensor, masks: Tensor, onto: Tensor, contrast: Tensor | None = None) -> Tensor:
    """Each defect's masked pixels over a good image (all (k, C, H, W), masks (k, 1, H, W) {0, 1}): a real defect
    on a part whose clean look is known, so it trains as a simulated anomaly does (reconstruction and focal loss).
    The defect is first scaled, per channel, by how much brighter the good image is than the defect's own just
    around the mask (a ring of H/32 pixels): parts lit differently would otherwise give every pasted defect a step
    in brightness at its border, which no real defect has and which the discriminator would learn instead.
    contrast (k,), if given: each defect's difference from the mean brightness of the ring around it is scaled by
    its factor, a fainter or stronger version of the same defect."""
    width = max(1, masks.shape[-2] // 32)
    ring = F.max_pool2d(masks, 2 * width + 1, stride=1, padding=width) - masks
    # + 1e-3: an empty ring (a mask over the whole image) leaves the defect as it is; a black ring cannot divide by 0
    around = (onto * ring).sum((2, 3), keepdim=True)
    matched = defects * ((around + 1e-3) / ((defects * ring).sum((2, 3), keepdim=True) + 1e-3))
    if contrast is not None:
        # the ring's mean brightness; where there is no ring (a mask over the whole image), the defect's own mean
        ring_area, area = ring.sum((2, 3), keepdim=True), masks.sum((2, 3), keepdim=True).clamp_min(1)
        level = torch.where(ring_area > 0, around / ring_area.clamp_min(1),
                            (matched * masks).sum((2, 3), keepdim=True) / area)
        matched = level + contrast[:, None, None, None] * (matched - level)
    return onto * (1 - masks) + matched.clamp(0, 1) * masks
