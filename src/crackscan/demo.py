"""A demonstration that needs no dataset: generated concrete-like images, classified and scanned.

``python -m crackscan.demo [OUT_DIR]`` writes a few generated patches and one generated photo, runs
the shipped model on them (``predict`` and ``scan``) and prints where the results are. The images are
synthetic (grey grain with drawn dark lines): they show the workflow, not the model's accuracy.
The same generators make the test suite's tiny datasets.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _crack_line(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int, thickness: int) -> None:
    x, y = int(rng.integers(0, width)), 0
    points = [(x, y)]
    step = max(2, height // 10)
    while y < height:
        x = int(np.clip(x + rng.integers(-width // 8, width // 8 + 1), 0, width - 1))
        y += int(rng.integers(step // 2 + 1, step + 2))
        points.append((x, y))
    draw.line(points, fill=(int(rng.integers(20, 60)),) * 3, width=thickness)


def concrete_patch(rng: np.random.Generator, size: int, crack: bool) -> Image.Image:
    """A grey, grainy concrete-like square patch; with ``crack`` a dark jagged line crosses it."""
    base = rng.integers(150, 200)
    pixels = np.clip(base + rng.normal(0, 12, (size, size, 1)) + rng.normal(0, 4, (size, size, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if crack:
        _crack_line(ImageDraw.Draw(image), rng, size, size, int(rng.integers(2, 5)))
    return image


def _photo_crack(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int, thickness: int) -> None:
    """A long crack from top to bottom, jagged at every scale: short steps whose sideways drift wanders and whose
    width varies. (Long straight strokes look like a drawn line, a cable or a joint, which the shipped model
    was trained to pass: the photo would show nothing.)"""
    x, y, drift = float(rng.uniform(0.3, 0.7) * width), 0.0, 0.0
    tone = (int(rng.integers(20, 60)),) * 3
    while y < height:
        drift = 0.8 * drift + rng.normal(0, 6)
        nx = float(np.clip(x + drift + rng.normal(0, 8), 0, width - 1))
        ny = y + float(rng.uniform(12, 30))
        draw.line([(x, y), (nx, ny)], fill=tone, width=max(2, int(round(thickness + rng.normal(0, 1.2)))))
        x, y = nx, ny


def concrete_photo(rng: np.random.Generator, width: int = 2016, height: int = 1512, crack: bool = True) -> Image.Image:
    """A photo-sized concrete-like surface, with one long crack down its left half when ``crack``."""
    small = rng.normal(170, 10, (height // 8, width // 8, 1))
    blotches = np.asarray(Image.fromarray(small[..., 0].astype(np.float32), "F").resize((width, height)))[..., None]
    pixels = np.clip(blotches + rng.normal(0, 10, (height, width, 1)) + rng.normal(0, 3, (height, width, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if crack:
        region = image.crop((0, 0, width // 2, height))
        _photo_crack(ImageDraw.Draw(region), rng, width // 2, height, max(4, width // 300))
        image.paste(region, (0, 0))
    return image


def main(argv: list[str] | None = None) -> int:
    from crackscan.cli import DISCLAIMER
    from crackscan.model import load_model
    from crackscan.runtime import tune_allocator
    from crackscan.scan import scan_paths

    tune_allocator()
    out = Path((argv or sys.argv[1:] or ["demo"])[0])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    patches = []
    for i, crack in enumerate([True, True, False, False]):
        path = out / f"patch-{i + 1}-{'crack' if crack else 'plain'}.jpg"
        concrete_patch(rng, 227, crack).save(path, quality=92)
        patches.append(path)
    photo = out / "photo-generated.jpg"
    concrete_photo(rng).save(photo, quality=90)
    model = load_model()
    print(f"model: {model.path} (input {model.input_size}px, threshold {model.threshold:.3f}, "
          f"scan threshold {model.scan_threshold:.3f})")
    print(f"{'crack_probability':>17}  {'label':<10} file")
    for p in model.predict(patches):
        print(f"{p.probability:>17.4f}  {p.label:<10} {p.source}")
    summary = scan_paths(model, [photo], out / "scan", quiet=True)
    for result in summary.results:
        d = result.to_dict()
        print(f"scan {photo.name}: verdict {'CRACK' if d['is_crack'] else 'no crack'}, "
              f"{len(d['regions'])} region(s), {d['flagged_fraction']:.1%} of the photo flagged")
    print(f"overlays and maps: {summary.out_dir}")
    print("These images are generated, not real concrete: use your own photos for real answers.")
    print(DISCLAIMER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
