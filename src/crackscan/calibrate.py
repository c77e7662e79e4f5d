"""The scan's verdict threshold, chosen on photo-sized mosaics of validation patches.

Why. The model's threshold answers "is this patch a crack?". A scan asks it of every map cell, about 1,900
of them in a 12-MP photo at the default scale, and calls the photo a crack when any cell says yes. A
per-patch false-alarm rate that is small for one patch is not small for 1,900: on photo-sized mosaics of
crack-free validation patches the shipped model's patch threshold (0.5) flagged 5 photos in 60
(``benchmarks/mosaic.py --part val``). The verdict needs its own threshold, chosen on whole photos.

What. Photo-sized mosaics of validation patches (:data:`GRID`: as many map cells as a 4032x3024 photo at
the default scale), half of them crack-free and half with one crack tile at a random place, are scanned as
``crackscan scan`` scans a photo. A crack-free mosaic is flagged at every threshold up to its largest cell
probability; a crack tile is found at every threshold up to the largest probability of the cells centred in
it. The scan threshold is the one with the best balanced accuracy over those photos (the mean of the share
of crack-free photos passed and the share of crack tiles found). When several thresholds tie, the lowest
wins, because a missed crack costs more than a photo looked at twice; and it is never below the model's
patch threshold, so a scan flags no cell that the patch classifier would not.

The figures behind the choice are kept in the model's metadata (``scan_calibration``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from crackscan.model import CrackModel
from crackscan.scan import ScanResult, scan_scaled

#: Tiles across and down a calibration photo: 17 x 13 patches of 227 px are 3859 x 2951 photo pixels,
#: about the 4032 x 3024 photos the dataset's patches were cut from.
GRID = (17, 13)


@dataclass
class ScanCalibration:
    """The chosen verdict threshold and the photo-level figures it was chosen on."""

    threshold: float
    balanced_accuracy: float
    crack_free_max: np.ndarray  # per crack-free photo: its largest cell probability
    crack_tile_max: np.ndarray  # per photo with a crack tile: the largest probability of the tile's cells
    patch_threshold: float
    seconds: float

    @property
    def photos(self) -> int:
        return int(len(self.crack_free_max) + len(self.crack_tile_max))

    def at(self, threshold: float) -> dict[str, int]:
        """Crack-free photos flagged and crack tiles found at ``threshold``."""
        return {"crack_free_flagged": int((self.crack_free_max >= threshold).sum()),
                "crack_found": int((self.crack_tile_max >= threshold).sum())}

    def to_meta(self) -> dict[str, Any]:
        return {
            "photos": self.photos,
            "crack_free": int(len(self.crack_free_max)),
            "with_crack": int(len(self.crack_tile_max)),
            "grid": list(GRID),
            "patch_threshold": self.patch_threshold,
            "balanced_accuracy": round(self.balanced_accuracy, 4),
            "at_scan_threshold": self.at(self.threshold),
            "at_patch_threshold": self.at(self.patch_threshold),
            "seconds": round(self.seconds, 1),
        }


def choose_threshold(crack_free_max: np.ndarray, crack_tile_max: np.ndarray, floor: float) -> tuple[float, float]:
    """A threshold at or above ``floor`` with the best photo-level balanced accuracy, and that accuracy.

    Thresholds between two neighbouring scores all give the same photo verdicts, so the candidates are
    ``floor`` and the midpoints between the distinct scores above it; of those with the best accuracy the
    lowest wins, i.e. ``floor`` or the middle of the lowest winning gap between two scores.
    """
    free, found = np.asarray(crack_free_max, np.float64), np.asarray(crack_tile_max, np.float64)
    if not len(free) or not len(found):
        raise ValueError("choosing a scan threshold needs crack-free photos and photos with a crack")
    scores = np.unique(np.concatenate([free, found]))
    scores = scores[scores > floor]
    candidates = np.concatenate([[floor], (np.concatenate([[floor], scores[:-1]]) + scores) / 2])
    passed = (free[None, :] < candidates[:, None]).mean(1)
    caught = (found[None, :] >= candidates[:, None]).mean(1)
    balanced = (passed + caught) / 2
    best = int(np.argmax(balanced))  # the first, i.e. the lowest, of any tie
    return float(candidates[best]), float(balanced[best])


def photo_mosaic(pixels: np.ndarray, negatives: np.ndarray, rng: np.random.Generator,
                 crack: tuple[int, int, int] | None = None) -> np.ndarray:
    """A GRID-sized mosaic of random ``negatives`` rows of ``pixels`` (N x S x S x 3 patches at the model's input
    size), with the patch ``crack[0]`` laid on tile ``(crack[1], crack[2])`` when given."""
    cols, rows = GRID
    chosen = negatives[rng.integers(len(negatives), size=(rows, cols))]
    if crack is not None:
        chosen[crack[1], crack[2]] = crack[0]
    size = pixels.shape[1]
    return np.ascontiguousarray(pixels[chosen].transpose(0, 2, 1, 3, 4).reshape(rows * size, cols * size, 3))


def tile_cells_max(result: ScanResult, row: int, col: int, tile: float) -> float:
    """The largest probability among the map cells whose patch is centred in tile ``(row, col)``."""
    rows, cols = result.map_shape
    cy = result.map_origin[1] + result.patch_size / 2 + result.stride * np.arange(rows)
    cx = result.map_origin[0] + result.patch_size / 2 + result.stride * np.arange(cols)
    inside_r = (cy >= row * tile) & (cy < (row + 1) * tile)
    inside_c = (cx >= col * tile) & (cx < (col + 1) * tile)
    cells = result.probability[np.ix_(inside_r, inside_c)]
    return float(cells.max()) if cells.size else 0.0


def photo_score(model: CrackModel, mosaic: np.ndarray, crack_tile: tuple[int, int] | None,
                backend: str = "auto") -> float:
    """Scan a mosaic (at the model's input size a tile) as ``scan`` scans a photo, and read what it tells: for a
    crack-free one its largest cell probability (flagged at every threshold up to it), else the largest among
    the cells centred in ``crack_tile`` (found at every threshold up to it), wherever else the map is high."""
    result = scan_scaled(model, mosaic, (mosaic.shape[1], mosaic.shape[0]), patch_size=model.input_size,
                         source="calibration photo", backend=backend)
    if crack_tile is None:
        return result.max_probability
    return tile_cells_max(result, crack_tile[0], crack_tile[1], model.input_size)


def calibrate_scan(
    model: CrackModel,
    pixels: np.ndarray,
    is_crack: np.ndarray,
    rows: np.ndarray,
    *,
    photos: int = 200,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = False,
    say: Callable[..., None] = lambda *a: None,
) -> ScanCalibration:
    """Choose the scan's verdict threshold (see the module's docstring).

    Args:
        model: The classifier, with its dense head when it has one (scans use it).
        pixels: Patches at the model's input size (N x S x S x 3 uint8), e.g. a dataset's.
        is_crack: Per row of ``pixels``, whether it is a crack patch.
        rows: The rows to build the photos from: the validation split's.
        photos: At most this many photo-sized mosaics, half crack-free and half with one crack tile, and
            at most two per crack patch in ``rows`` (each about as long to scan as a 12-MP photo: 0.3 s on
            2 cores).
        progress: Show a progress bar.

    Raises:
        ValueError: ``rows`` lack crack patches or crack-free ones, or ``photos`` is below 2.
    """
    started = time.perf_counter()
    rows = np.asarray(rows)
    cracks, negatives = rows[is_crack[rows]], rows[~is_crack[rows]]
    if not len(cracks) or not len(negatives):
        raise ValueError("calibrating the scan threshold needs crack and crack-free validation patches")
    photos = min(photos, 2 * len(cracks))
    if photos < 2:
        raise ValueError(f"calibrating the scan threshold needs at least 2 photos, got {photos}")
    rng = np.random.default_rng(seed)
    cols, grid_rows = GRID
    free_max, tile_max = [], []
    for index in tqdm(range(photos), desc="scan threshold", unit="photo", disable=not progress, leave=False):
        crack = None
        if index % 2:
            crack = (int(cracks[rng.integers(len(cracks))]), int(rng.integers(grid_rows)), int(rng.integers(cols)))
        mosaic = photo_mosaic(pixels, negatives, rng, crack)
        score = photo_score(model, mosaic, None if crack is None else crack[1:], backend)
        (free_max if crack is None else tile_max).append(score)
    free, found = np.array(free_max), np.array(tile_max)
    threshold, balanced = choose_threshold(free, found, model.threshold)
    calibration = ScanCalibration(threshold=threshold, balanced_accuracy=balanced, crack_free_max=free,
                                  crack_tile_max=found, patch_threshold=model.threshold,
                                  seconds=time.perf_counter() - started)
    at_scan, at_patch = calibration.at(threshold), calibration.at(model.threshold)
    say(f"scan threshold {threshold:.3f} on {photos} photo-sized validation mosaics: "
        f"{at_scan['crack_free_flagged']} of {len(free)} crack-free flagged, {at_scan['crack_found']} of "
        f"{len(found)} crack tiles found (at the patch threshold {model.threshold:.3f}: "
        f"{at_patch['crack_free_flagged']} and {at_patch['crack_found']})")
    return calibration


def store(model: CrackModel, calibration: ScanCalibration, source: str) -> None:
    """Record the calibration in the model's metadata (saved with the model by the caller)."""
    model.meta["scan_threshold"] = calibration.threshold  # unrounded: rounding could take it below its floor
    model.meta["scan_threshold_source"] = source
    model.meta["scan_calibration"] = calibration.to_meta()
