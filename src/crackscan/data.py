"""Labelled image folders: find the files, check every one, find duplicates, split without leakage.

The Mendeley crack dataset cuts 40,000 patches from only 458 photos, and neighbouring file numbers come
from the same photo. A file-by-file shuffle puts near-identical patches on both sides of a split and
inflates every score, so crackscan splits whole *groups*: from a manifest when one is given (the
``blocks.csv`` shipped beside the dev data: ``class,file,block``, or any CSV with ``file`` and ``group``
columns), otherwise from runs of consecutive file numbers. Byte-identical files are merged into one
group first, so a duplicate can never straddle a split.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from crackscan.images import ImageError, is_image_path, load_patch, read_bytes
from crackscan.runtime import parallel_map, shared_empty

#: Folder names recognised as the crack class (case-insensitive).
CRACK_NAMES = ("positive", "positives", "crack", "cracks", "cracked", "crack_positive", "defect", "yes", "1")
SPLITS = ("train", "val", "test")
MANIFEST_NAMES = ("blocks.csv", "groups.csv", "manifest.csv")


class DataError(ValueError):
    """A dataset that cannot be used as given; the message says what is wrong and what to do."""


@dataclass
class Sample:
    """One usable labelled image."""

    path: Path
    rel: str  # path relative to the dataset root, with forward slashes: the key in every CSV
    label: int
    group: str = ""
    sha1: str = ""
    split: str = ""


@dataclass
class Problem:
    """A file that was skipped, and why."""

    file: str
    reason: str


@dataclass
class Dataset:
    """A checked dataset: samples with decoded pixels, and the files that were skipped."""

    root: Path
    classes: list[str]
    crack_index: int
    samples: list[Sample]
    pixels: np.ndarray  # N x S x S x 3 uint8, aligned with samples; read-only (may be memory shared with workers)
    problems: list[Problem] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (dropped copy, kept file)

    def indices(self, split: str) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.samples) if s.split == split], dtype=np.int64)

    def labels(self, idx: Sequence[int] | None = None) -> np.ndarray:
        idx = range(len(self.samples)) if idx is None else idx
        return np.array([self.samples[i].label for i in idx], dtype=np.int64)


def find_classes(root: Path, crack_class: str | None = None) -> tuple[list[str], int]:
    """The class folders under ``root`` (sorted) and the index of the crack class."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders; expected one folder per class, e.g. Positive/ and Negative/")
    if len(classes) != 2:
        raise DataError(
            f"{root}: found {len(classes)} class folders ({', '.join(classes)}); crackscan trains crack vs "
            "no-crack and needs exactly two (e.g. Positive/ and Negative/)"
        )
    if crack_class is not None:
        matches = [i for i, c in enumerate(classes) if c.lower() == crack_class.lower()]
        if not matches:
            raise DataError(f"--crack-class {crack_class!r} is not one of the class folders {classes}")
        return classes, matches[0]
    matches = [i for i, c in enumerate(classes) if c.lower() in CRACK_NAMES]
    if len(matches) != 1:
        raise DataError(f"{root}: cannot tell which of {classes} is the crack class; name it with --crack-class")
    return classes, matches[0]


def list_files(root: Path, classes: Sequence[str]) -> tuple[list[tuple[Path, int]], list[Problem]]:
    """Every image-suffixed entry under each class folder; anything else is reported, not read."""
    files, problems = [], []
    for label, name in enumerate(classes):
        entries = sorted((root / name).rglob("*"))
        for path in entries:
            if path.is_dir() and not is_image_path(path):
                continue
            if is_image_path(path):
                files.append((path, label))
            elif not path.name.startswith("."):
                problems.append(Problem(_rel(path, root), "not an image file suffix; ignored"))
        if not any(lbl == label for _, lbl in files):
            raise DataError(f"{root / name}: class folder has no image files")
    return files, problems


def _rel(path: Path, root: Path) -> str:
    # A name that is not valid UTF-8 (e.g. Latin-1 bytes from an old camera or share) becomes printable
    # text such as "b\\xe9ton.jpg", so every CSV, JSON and plot can hold it; the file is read by its path.
    text = path.relative_to(root).as_posix()
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


#: Pixel arrays of the load_dataset calls in progress, by id. Decode workers are forked after the array
#: is made (shared memory, see :func:`crackscan.runtime.shared_empty`), find it here, write each image
#: into its row and send back only the hash: pickling every image through a pipe cost a third of the
#: decoding time (dev set, 2 cores: 4.8-5.2 s with the pixels sent back, 3.4 s without).
_OUTPUTS: dict[int, np.ndarray] = {}


def _check_one(item: tuple[int, Path], root: Path, size: int, output: int) -> tuple[str, str | None]:
    """Read, hash and decode one file into row ``i`` of the output array: (sha1, error)."""
    i, path = item
    pixels = _OUTPUTS[output]  # outside the try: a worker that cannot see the array is a bug, not a bad file
    name = _rel(path, root)
    try:
        data = read_bytes(path)
        sha1 = hashlib.sha1(data).hexdigest()
        pixels[i] = load_patch(data, size, name=name)
        return sha1, None
    except ImageError as err:
        return "", err.reason
    except Exception as err:  # a decoder crash on one file must not end the run
        return "", f"cannot decode ({type(err).__name__}: {err})"


def load_dataset(
    root: str | Path,
    size: int,
    *,
    crack_class: str | None = None,
    quiet: bool = False,
    processes: bool | None = None,
) -> Dataset:
    """Find, check and decode every image under ``root`` once; skip and report bad and duplicate files.

    Args:
        root: A folder with one subfolder per class (the Mendeley layout: ``Positive/``, ``Negative/``).
        size: Side length the pixels are decoded to (the model's input size).
        crack_class: Name of the crack class folder; recognised automatically when omitted.
        quiet: No progress bar.
        processes: Decode in worker processes (True), threads (False), or processes for large folders
            on Linux (None, the default; see :func:`crackscan.runtime.parallel_map`).

    Raises:
        DataError: Missing folder, not exactly two classes, an empty class.
    """
    root = Path(root)
    classes, crack_index = find_classes(root, crack_class)
    files, problems = list_files(root, classes)
    decoded = shared_empty((len(files), size, size, 3), np.uint8)
    output = id(decoded)
    _OUTPUTS[output] = decoded
    try:
        with tqdm(total=len(files), desc="check+decode", unit="img", disable=quiet) as bar:
            results = parallel_map(functools.partial(_check_one, root=root, size=size, output=output),
                                   list(enumerate(path for path, _ in files)), processes=processes,
                                   progress=bar.update)
    finally:
        del _OUTPUTS[output]
    samples, rows, seen, duplicates, conflicts = [], [], {}, [], defaultdict(set)
    for i, ((path, label), (sha1, error)) in enumerate(zip(files, results)):
        rel = _rel(path, root)
        if error is not None:
            problems.append(Problem(rel, error))
            continue
        if sha1 in seen:
            kept = samples[seen[sha1]]
            if kept.label != label:
                conflicts[sha1].add(rel)
            duplicates.append((rel, kept.rel))
            continue
        seen[sha1] = len(samples)
        samples.append(Sample(path=path, rel=rel, label=label, sha1=sha1))
        rows.append(i)
    # A byte-identical image filed under both classes has no trustworthy label: drop every copy.
    if conflicts:
        bad = {seen[sha] for sha in conflicts}
        for i in sorted(bad):
            others = ", ".join(sorted(conflicts[samples[i].sha1]))
            problems.append(Problem(samples[i].rel, f"identical to {others} in another class; label conflict, dropped"))
        # Its copies went too (none was "kept once"): each is reported as the conflict it is.
        dropped = {samples[i].rel for i in bad}
        for copy, kept in duplicates:
            if kept in dropped:
                problems.append(Problem(copy, f"identical to {kept}, in conflict with another class; dropped"))
        duplicates = [(copy, kept) for copy, kept in duplicates if kept not in dropped]
        samples = [s for i, s in enumerate(samples) if i not in bad]
        rows = [r for i, r in enumerate(rows) if i not in bad]
    for label, name in enumerate(classes):
        if not any(s.label == label for s in samples):
            # Said here, as no report gets written: the run ends before any.
            mine = [p for p in problems if p.file.split("/", 1)[0] == name]
            shown = "; ".join(f"{p.file}: {p.reason}" for p in mine[:3]) + ("; ..." if len(mine) > 3 else "")
            raise DataError(f"{root / name}: no readable images left in this class"
                            + (f" ({len(mine)} skipped: {shown})" if mine else ""))
    pixels = decoded if len(rows) == len(files) else decoded[rows]
    # Read-only: a process forked later would otherwise write into this process's pixels through the
    # shared mapping, with no copy-on-write between them.
    pixels.flags.writeable = False
    return Dataset(
        root=root,
        classes=classes,
        crack_index=crack_index,
        samples=samples,
        pixels=pixels,
        problems=problems,
        duplicates=duplicates,
    )


_NUMBER = re.compile(r"(\d+)")


def read_manifest(path: Path) -> dict[str, str]:
    """``file -> group`` from a CSV with columns ``file`` and ``group`` (or Mendeley's ``class,file,block``)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = set(reader.fieldnames or [])
        key = "group" if "group" in fields else "block" if "block" in fields else None
        if "file" not in fields or key is None:
            raise DataError(f"{path}: a group manifest needs columns 'file' and 'group' (or 'block')")
        out = {}
        for row in reader:
            cls = row.get("class", "")
            out[row["file"].replace("\\", "/")] = f"{cls}/{row[key]}" if cls else row[key]
    return out


def assign_groups(dataset: Dataset, manifest: str | Path | None = None, run_length: int = 500) -> str:
    """Give every sample a group; returns how groups were made, for the run's metadata.

    Order of preference: the manifest given, a manifest found in the dataset root, runs of ``run_length``
    consecutive file numbers within a class. Byte-identical duplicates share their kept file's group
    automatically, since the copies were dropped before splitting.
    """
    if manifest is None:
        found = [dataset.root / n for n in MANIFEST_NAMES if (dataset.root / n).is_file()]
        manifest = found[0] if found else None
    if manifest is not None:
        mapping = read_manifest(Path(manifest))
        missing = 0
        for s in dataset.samples:
            group = mapping.get(s.rel)
            if group is None:
                missing += 1
                group = _run_group(s, dataset.classes, run_length)
            s.group = group
        how = f"manifest {Path(manifest).name}"
        return how + (f" ({missing} files not in it grouped by number runs)" if missing else "")
    for s in dataset.samples:
        s.group = _run_group(s, dataset.classes, run_length)
    return f"runs of {run_length} consecutive file numbers"


def group_by_file(dataset: Dataset) -> None:
    """Every sample its own group: the fall-back for data whose file numbers say nothing of its photos."""
    for s in dataset.samples:
        s.group = f"{dataset.classes[s.label]}/file:{s.rel}"


def _run_group(sample: Sample, classes: Sequence[str], run_length: int) -> str:
    match = _NUMBER.search(sample.path.stem)
    cls = classes[sample.label]
    if match is None:
        return f"{cls}/file:{Path(sample.rel).stem}"  # its own group, under its printable name (see _rel)
    return f"{cls}/run{int(match.group(1)) // run_length}"


def split_groups(dataset: Dataset, val: float = 0.15, test: float = 0.15, seed: int = 0) -> None:
    """Assign whole groups to train/val/test, per class, reproducibly for a seed.

    Each class's groups are shuffled with the seed and dealt, largest first, to whichever split is
    furthest below its target share of that class's files. Raises DataError when a class has too few
    groups to give every requested split at least one.
    """
    rng = np.random.default_rng(seed)
    targets = {"train": 1.0 - val - test, "val": val, "test": test}
    wanted = [s for s in SPLITS if targets[s] > 0]
    by_group: dict[str, list[Sample]] = defaultdict(list)
    for s in dataset.samples:
        by_group[s.group].append(s)
    per_class: dict[int, list[str]] = defaultdict(list)
    for group, members in by_group.items():
        majority = Counter(m.label for m in members).most_common(1)[0][0]
        per_class[majority].append(group)
    for label, groups in sorted(per_class.items()):
        if len(groups) < len(wanted):
            raise DataError(
                f"class {dataset.classes[label]!r} has {len(groups)} group(s) but the split needs at least "
                f"{len(wanted)} ({', '.join(wanted)}): add images, give a finer group manifest, or shrink --run-length"
            )
        groups = sorted(groups)
        rng.shuffle(groups)
        groups.sort(key=lambda g: -len(by_group[g]))  # stable: ties keep the seeded order
        total = sum(len(by_group[g]) for g in groups)
        filled = dict.fromkeys(wanted, 0)
        for n, group in enumerate(groups):
            remaining = len(groups) - n
            empty = [s for s in wanted if filled[s] == 0]
            if len(empty) >= remaining:  # make sure no split ends up without a group of this class
                choice = empty[0]
            else:
                choice = min(wanted, key=lambda s: filled[s] / total - targets[s])
            filled[choice] += len(by_group[group])
            for member in by_group[group]:
                member.split = choice


def write_split(dataset: Dataset, path: Path) -> str:
    """Write the split CSV (file, class, group, split, sha1); returns its sha256, stored in the model."""
    rows = [("file", "class", "group", "split", "sha1")]
    rows += [(s.rel, dataset.classes[s.label], s.group, s.split, s.sha1) for s in dataset.samples]
    text = "".join(",".join(_csv_field(v) for v in row) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()


def _csv_field(value: str) -> str:
    return f'"{value.replace(chr(34), chr(34) * 2)}"' if any(c in value for c in ',"\n') else value


def read_split(path: str | Path) -> list[dict[str, str]]:
    """Rows of a split CSV written by :func:`write_split`."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"file", "class", "split"} <= set(rows[0]):
        raise DataError(f"{path}: not a crackscan split CSV (needs columns file, class, split)")
    return rows


def apply_split(dataset: Dataset, rows: Iterable[dict[str, str]]) -> None:
    """Reuse a written split: each sample gets its recorded split; files not in it are left out."""
    recorded = {r["file"]: r for r in rows}
    for s in dataset.samples:
        row = recorded.get(s.rel)
        s.split = row["split"] if row else ""
        s.group = row.get("group", "") if row else ""


def split_changes(dataset: Dataset, rows: Iterable[dict[str, str]]) -> list[str]:
    """How the data differs from a written split: files new to it, missing from the data, or changed (other
    bytes or another class). Empty when the data is the data the split was written for."""
    recorded = {r["file"]: r for r in rows}
    current = {s.rel: s for s in dataset.samples}
    changed = [rel for rel in current.keys() & recorded.keys()
               if recorded[rel].get("sha1", current[rel].sha1) != current[rel].sha1
               or recorded[rel].get("class") != dataset.classes[current[rel].label]]
    out = []
    for what, files in (("new", current.keys() - recorded.keys()), ("missing", recorded.keys() - current.keys()),
                        ("changed", changed)):
        if files:
            shown = sorted(files)
            out.append(f"{len(shown)} {what} ({', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''})")
    return out


def write_problems(dataset: Dataset, path: Path) -> None:
    """The skipped-files report: every file not used, with the reason."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "reason"])
        for p in dataset.problems:
            writer.writerow([p.file, p.reason])
        for dropped, kept in dataset.duplicates:
            writer.writerow([dropped, f"byte-identical duplicate of {kept}; kept once"])
