"""Finding anomalies in your own, unlabelled images: streamed scoring with verdicts, defect masks and regions.

Images are decoded, scored and written chunk by chunk (--batch_size), so scores.csv and regions.csv grow
as the run goes and memory does not grow with the number of images; an unreadable file gets a row with
the reason instead of stopping the run. Panels and masks are at each image's own resolution.
"""
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import CheckpointError, ModelInfo
from data_loader import DataError, decode, default_workers, list_images, read_each, resize, to_tensor, warn
from evaluate import predict
from metrics import image_scores, verdict
from model_files import checkpoint_files, load_model
from regions import defect_regions, resize_map
from visualize import panel, write_png


def chosen_threshold(value: str | float | None, info: ModelInfo, kind: str, flag: str) -> float | None:
    """A number as given; auto (and the default) from the checkpoint; auto without a stored one is an error."""
    if value is not None and value != "auto":
        return value
    stored = info.threshold(kind)
    if value == "auto" and stored is None:
        raise CheckpointError(f"{flag} auto: {info.run} holds no {kind} threshold (it is stored when training scores "
                              f"a labelled test set); score a labelled test set first and pass its threshold from "
                              f"results.json, or give a number")
    return stored


def image_paths(images: Path) -> list[Path]:
    if images.is_dir():
        paths = list_images(images, recursive=True)
    elif images.is_file():
        paths = [images]
    else:
        raise DataError(f"--images {images} does not exist")
    if not paths:
        raise DataError(f"--images {images} holds no images")
    return paths


def score_images(checkpoint: Path, images: Path, out_dir: Path, device: torch.device,
                 threshold: str | float | None = None, pixel_threshold: str | float | None = None,
                 image_size: tuple[int, int] | None = None, batch_size: int = 16, save_images: bool = True,
                 workers: int | None = None) -> int:
    """Score an image or a folder of them (recursively); returns how many were scored."""
    files = checkpoint_files([checkpoint])
    if len(files) != 1:
        raise CheckpointError(f"--images takes exactly one checkpoint; {checkpoint} holds {len(files)}")
    model, info = load_model(files[0], device, image_size)
    image_threshold = chosen_threshold(threshold, info, "image", "--threshold")
    pixel_threshold = chosen_threshold(pixel_threshold, info, "pixel", "--pixel_threshold")
    paths = image_paths(images)
    print(f"image threshold: {'none (scores only; --threshold)' if image_threshold is None else image_threshold}; "
          f"pixel threshold: {'none (no masks; --pixel_threshold)' if pixel_threshold is None else pixel_threshold}")
    size, workers = image_size or info.image_size, workers or default_workers()
    stem_of = (lambda p: p.relative_to(images).with_suffix("")) if images.is_dir() else (lambda p: Path(p.stem))
    out_dir.mkdir(parents=True, exist_ok=True)
    scored, errors, started = 0, [], time.perf_counter()
    with open(out_dir / "scores.csv", "w", newline="") as scores_file, \
            open(out_dir / "regions.csv", "w", newline="") as regions_file, \
            tqdm(total=len(paths), unit="img", disable=not sys.stderr.isatty()) as bar:
        scores_csv = csv.DictWriter(scores_file, ["path", "score", "verdict", "regions", "panel", "mask", "error"])
        regions_csv = csv.DictWriter(regions_file, ["path", "region", "x", "y", "width", "height", "area",
                                                    "max_score", "mean_score"])
        scores_csv.writeheader()
        regions_csv.writeheader()
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            decoded = read_each(lambda p, _: decode(p), chunk, 0, workers)
            for image_path, error in ((p, d) for p, d in zip(chunk, decoded) if isinstance(d, str)):
                warn(f"skipped: {error}")
                errors.append(error)
                scores_csv.writerow({"path": str(image_path), "error": error})
            readable = [(p, d) for p, d in zip(chunk, decoded) if not isinstance(d, str)]
            if readable:
                batch = to_tensor([resize(image, size) for _, image in readable])
                maps, recs = predict(model, batch, device, info.channel_order, len(batch), keep_reconstructions=True)
                for (image_path, image), score, rec, amap in zip(readable, image_scores(maps).tolist(), recs, maps):
                    row, regions = image_outputs(out_dir / stem_of(image_path), image_path, image, rec, amap, score,
                                                 image_threshold, pixel_threshold, save_images)
                    scores_csv.writerow(row)
                    regions_csv.writerows(regions)
                    if row["verdict"]:
                        tqdm.write(f"{row['verdict']:7} {score:.4f} {image_path}", file=sys.stdout)
                scored += len(readable)
            scores_file.flush()
            regions_file.flush()
            bar.update(len(chunk))
    if scored == 0:
        raise DataError(f"--images {images}: none of the {len(paths)} image(s) could be read ({errors[0]})")
    seconds = time.perf_counter() - started
    print(f"scored {scored} image(s) in {seconds:.1f} s ({scored / seconds:.1f} images/s)"
          + (f", skipped {len(errors)} unreadable" if errors else "")
          + f": {out_dir / 'scores.csv'}, {out_dir / 'regions.csv'}, panels and masks under {out_dir}")
    return scored


def image_outputs(stem: Path, image_path: Path, image: np.ndarray, rec: torch.Tensor, amap: torch.Tensor,
                  score: float, image_threshold: float | None, pixel_threshold: float | None,
                  save_images: bool) -> tuple[dict, list[dict]]:
    """Write one image's panel (stem.png) and defect mask (stem_mask.png); return its CSV rows."""
    height, width = image.shape[:2]
    big_map = resize_map(amap.cpu().numpy(), height, width)
    decision = verdict(score, image_threshold)
    row = {"path": str(image_path), "score": f"{score:.9g}", "verdict": decision, "regions": "", "panel": "",
           "mask": "", "error": ""}
    mask, regions = (None, [])
    mask_path, panel_path = stem.with_name(stem.name + "_mask.png"), stem.with_name(stem.name + ".png")
    if pixel_threshold is not None:
        mask, regions = defect_regions(big_map, pixel_threshold)
        row["mask"], row["regions"] = str(mask_path), len(regions)
        write_png(mask_path, mask)
    if save_images:
        caption = f"score {score:.3f}" + (f" | {decision} at threshold {image_threshold:.3f}" if decision else "") + (
            f" | {len(regions)} region(s)" if pixel_threshold is not None else "")
        row["panel"] = str(panel_path)
        write_png(panel_path, panel(image, rec, big_map, caption=caption, defect_mask=mask))
    return row, [{"path": str(image_path), "region": i + 1, **{k: f"{v:.6f}" if isinstance(v, float) else v
                                                                for k, v in region.items()}}
                 for i, region in enumerate(regions)]
