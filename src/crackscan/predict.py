"""Classify many images fast: decode on worker threads while the network runs, never stop on a bad file."""

from __future__ import annotations

import glob
import os
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from crackscan.images import ImageError, ImageSource, describe, is_image_path, load_patch, oriented_size, read_source
from crackscan.model import CrackModel, Prediction, check_threshold
from crackscan.runtime import cpu_count


def expand_paths(items: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Files, folders (searched recursively for image files) and glob patterns, in a stable order, each file once
    (a ``**`` pattern matches a folder and the files in it).

    A name that matches nothing is still yielded, so that the reader reports it as missing; so is a folder that
    cannot be searched (no permission), after the images found, so that the reader reports it too.
    """
    seen: set[Path] = set()
    for path in _expand(items):
        try:  # the same file by two names (a glob goes through links to folders) is read once
            key = path.resolve() if path.exists() else path
        except OSError:  # a link loop, a folder that cannot be searched: the reader says what is wrong
            key = path
        if key not in seen:
            seen.add(key)
            yield path


def _expand(items: Iterable[str | os.PathLike]) -> Iterator[Path]:
    for item in items:
        text = str(item)
        path = Path(text)
        if path.is_dir() and not is_image_path(path):
            found: list[Path] = []
            unsearchable: list[Path] = []
            # Symbolic links to folders are not followed (no loops), as pathlib's rglob does.
            for root, _, files in os.walk(path, onerror=lambda err: unsearchable.append(Path(err.filename))):
                found += [Path(root) / name for name in files if is_image_path(Path(name))]
            yield from sorted(found)
            yield from sorted(unsearchable)
        elif not path.exists() and not path.is_symlink() and glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            yield from _expand(matches) if matches else [path]  # a folder it matches is searched, as named
        else:
            yield path


#: Files at least this large have their size read from the header too: a patch's JPEG is 10-30 KB; a file
#: this large may be a whole photo, which one patch-sized input squeezes beyond recognition.
SIZE_CHECK_BYTES = 48_000


def _decode(source: ImageSource, size: int) -> tuple[np.ndarray | None, str | None, tuple[int, int] | None]:
    name = describe(source)
    try:
        data = read_source(source, name)
        pixels = load_patch(data, size, name)
        return pixels, None, oriented_size(data, cheap=True) if len(data) >= SIZE_CHECK_BYTES else None
    except ImageError as err:
        return None, str(err), None
    except Exception as err:  # a decoder bug must not end a batch of thousands
        return None, f"{name}: cannot decode ({type(err).__name__}: {err})", None


def predict_sources(
    model: CrackModel,
    sources: Iterable[ImageSource],
    *,
    batch_size: int = 64,
    threshold: float | None = None,
    backend: str = "auto",
    workers: int | None = None,
) -> Iterator[Prediction]:
    """Yield one Prediction per source, in order; unreadable sources yield a Prediction with ``error``."""
    check_threshold(threshold)
    if batch_size < 1:
        raise ValueError(f"batch_size must be 1 or more, got {batch_size}")
    size = model.input_size
    workers = workers or max(2, cpu_count())
    iterator = iter(sources)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # Decode the next batch while this one runs through the network (PIL releases the GIL).
        pending = list(pool.map(lambda s: (s, _decode(s, size)), islice(iterator, batch_size)))
        while pending:
            future_batch = pool.map(lambda s: (s, _decode(s, size)), list(islice(iterator, batch_size)))
            good = [(i, px) for i, (_, (px, _, _)) in enumerate(pending) if px is not None]
            probs = np.full(len(pending), np.nan, dtype=np.float32)
            if good:
                probs[[i for i, _ in good]] = model.crack_probability(np.stack([px for _, px in good]), backend)
            for (source, (_, error, shape)), p in zip(pending, probs):
                name = describe(source)
                if error is not None:
                    yield Prediction(source=name, probability=float("nan"), label="error", is_crack=False, error=error)
                else:
                    label = model.label_for(float(p), threshold)
                    yield Prediction(source=name, probability=float(p), label=label, is_crack=label == model.crack_class,
                                     image_size=shape)
            pending = list(future_batch)
