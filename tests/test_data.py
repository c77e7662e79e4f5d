"""Finding, checking, de-duplicating and splitting labelled folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from conftest import make_dataset, require, MENDELEY_DEV
from crackscan import data as data_module
from crackscan.data import (
    DataError,
    apply_split,
    assign_groups,
    find_classes,
    load_dataset,
    read_split,
    split_groups,
    write_problems,
    write_split,
)
from crackscan.images import load_patch


def _split_dataset(root: Path, seed: int = 0, run_length: int = 5):
    ds = load_dataset(root, 32, quiet=True)
    assign_groups(ds, run_length=run_length)
    split_groups(ds, 0.2, 0.2, seed)
    return ds


def test_crack_class_is_recognised_and_can_be_named(tmp_path):
    for name in ("Positive", "Negative"):
        (tmp_path / name).mkdir()
    assert find_classes(tmp_path) == (["Negative", "Positive"], 1)
    (tmp_path / "Positive").rename(tmp_path / "Spalling")
    with pytest.raises(DataError, match="--crack-class"):
        find_classes(tmp_path)
    assert find_classes(tmp_path, "spalling") == (["Negative", "Spalling"], 1)


def test_empty_folder_and_missing_class_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(tmp_path, 32, quiet=True)
    make_dataset(tmp_path, per_class=3)
    shutil.rmtree(tmp_path / "Negative")
    with pytest.raises(DataError, match="exactly two"):
        load_dataset(tmp_path, 32, quiet=True)
    (tmp_path / "Negative").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_dataset(tmp_path, 32, quiet=True)


def test_grouped_split_never_leaks_and_is_reproducible(tmp_path):
    root = make_dataset(tmp_path, per_class=40)
    a = _split_dataset(root, seed=3)
    splits_of_group = defaultdict(set)
    for s in a.samples:
        splits_of_group[s.group].add(s.split)
    assert all(len(v) == 1 for v in splits_of_group.values()), "a group straddles splits"
    assert {s.split for s in a.samples} == {"train", "val", "test"}
    for label in (0, 1):  # every split has both classes
        assert {s.split for s in a.samples if s.label == label} == {"train", "val", "test"}
    b = _split_dataset(root, seed=3)
    assert [s.split for s in a.samples] == [s.split for s in b.samples]
    c = _split_dataset(root, seed=4)
    assert [s.split for s in a.samples] != [s.split for s in c.samples]


def test_numbered_runs_form_groups(tmp_path):
    root = make_dataset(tmp_path, per_class=20)
    ds = _split_dataset(root, run_length=5)
    groups = {s.rel: s.group for s in ds.samples}
    assert groups["Positive/00001.jpg"] == groups["Positive/00004.jpg"] != groups["Positive/00005.jpg"]
    assert groups["Positive/00001.jpg"] != groups["Negative/00001.jpg"]


def test_manifest_groups_are_used(tmp_path):
    root = make_dataset(tmp_path, per_class=12)
    lines = ["class,file,block"]
    for cls in ("Positive", "Negative"):
        lines += [f"{cls},{cls}/{i + 1:05d}.jpg,{i % 4}" for i in range(12)]
    (root / "blocks.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(root, 32, quiet=True)
    how = assign_groups(ds)
    assert "blocks.csv" in how
    assert {s.group for s in ds.samples if s.label == 1} == {"Positive/0", "Positive/1", "Positive/2", "Positive/3"}


def test_duplicates_never_straddle_the_split(tmp_path):
    root = make_dataset(tmp_path, per_class=40)
    # Copy files from the run that lands in one split into names that would group elsewhere.
    for i in range(1, 41, 4):
        shutil.copy(root / "Positive" / f"{i:05d}.jpg", root / "Positive" / f"{(i + 17) % 40 + 100:05d}.jpg")
    ds = _split_dataset(root)
    assert len(ds.duplicates) == 10
    by_hash = defaultdict(set)
    for s in ds.samples:
        by_hash[s.sha1].add(s.split)
    assert all(len(v) == 1 for v in by_hash.values())
    assert len({s.sha1 for s in ds.samples}) == len(ds.samples)


def test_identical_file_in_both_classes_is_dropped(tmp_path):
    root = make_dataset(tmp_path, per_class=10)
    shutil.copy(root / "Positive" / "00003.jpg", root / "Negative" / "09999.jpg")
    ds = load_dataset(root, 32, quiet=True)
    assert "Positive/00003.jpg" not in {s.rel for s in ds.samples}
    assert any("label conflict" in p.reason for p in ds.problems)
    _assert_pixels_are_the_samples(ds, 32)


def test_every_copy_of_a_file_in_both_classes_is_reported_as_dropped(tmp_path):
    root = make_dataset(tmp_path, per_class=10)
    shutil.copy(root / "Positive" / "00003.jpg", root / "Positive" / "00099.jpg")  # a copy in its own class
    shutil.copy(root / "Positive" / "00003.jpg", root / "Negative" / "09999.jpg")  # and one in the other
    ds = load_dataset(root, 32, quiet=True)
    copies = {"Positive/00003.jpg", "Positive/00099.jpg", "Negative/09999.jpg"}
    assert not copies & {s.rel for s in ds.samples}
    write_problems(ds, tmp_path / "skipped.csv")
    report = (tmp_path / "skipped.csv").read_text().splitlines()[1:]
    assert {line.split(",", 1)[0] for line in report} == copies  # each once, none "kept once"
    assert all("conflict" in line and "dropped" in line for line in report), report
    assert ds.duplicates == []


def test_corrupt_files_are_reported_and_skipped(tmp_path):
    root = make_dataset(tmp_path, per_class=10)
    (root / "Positive" / "00100.jpg").write_bytes(b"")
    good = (root / "Negative" / "00001.jpg").read_bytes()
    (root / "Negative" / "00100.jpg").write_bytes(good[: len(good) // 2])
    (root / "Negative" / "notes.txt").write_text("not an image")
    ds = load_dataset(root, 32, quiet=True)
    reasons = {p.file: p.reason for p in ds.problems}
    assert "empty" in reasons["Positive/00100.jpg"]
    assert "truncated" in reasons["Negative/00100.jpg"]
    assert "Negative/notes.txt" in reasons
    assert len(ds.samples) == 20 and ds.pixels.shape == (20, 32, 32, 3)
    write_problems(ds, tmp_path / "skipped.csv")
    report = (tmp_path / "skipped.csv").read_text()
    assert "Positive/00100.jpg" in report and "Negative/00100.jpg" in report


def test_split_csv_round_trip(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=20)
    ds = _split_dataset(root)
    digest = write_split(ds, tmp_path / "split.csv")
    assert len(digest) == 64
    again = load_dataset(root, 32, quiet=True)
    apply_split(again, read_split(tmp_path / "split.csv"))
    assert [s.split for s in again.samples] == [s.split for s in ds.samples]


@pytest.mark.slow
def test_mendeley_blocks_split_holds_blocks_together():
    root = require(MENDELEY_DEV)
    from crackscan.data import Sample, Dataset, list_files, find_classes as fc

    classes, crack = fc(root)
    files, _ = list_files(root, classes)
    ds = Dataset(root, classes, crack, [Sample(p, p.relative_to(root).as_posix(), lbl) for p, lbl in files], np.zeros(0))
    assert "blocks.csv" in assign_groups(ds)
    split_groups(ds, 0.15, 0.15, 0)
    seen = defaultdict(set)
    for s in ds.samples:
        seen[s.group].add(s.split)
    assert len(seen) == 40 and all(len(v) == 1 for v in seen.values())


def test_worker_processes_decode_exactly_what_threads_decode(tmp_path):
    # Large folders are decoded in forked processes (the GIL halves what threads get); the result must
    # not depend on which: same pixels, hashes, duplicates and skipped files, in the same order.
    root = make_dataset(tmp_path, per_class=30)
    (root / "Positive" / "broken.jpg").write_bytes((root / "Positive").joinpath(
        sorted(p.name for p in (root / "Positive").iterdir())[0]).read_bytes()[:200])
    shutil.copy(sorted((root / "Negative").iterdir())[0], root / "Negative" / "copy.jpg")
    threads = load_dataset(root, 32, quiet=True, processes=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pool that falls back to threads warns: that must not happen here
        processes = load_dataset(root, 32, quiet=True, processes=True)
    assert [(s.rel, s.sha1, s.label) for s in processes.samples] == [(s.rel, s.sha1, s.label) for s in threads.samples]
    assert np.array_equal(processes.pixels, threads.pixels)
    assert processes.duplicates == threads.duplicates and len(threads.duplicates) == 1
    assert [(p.file, p.reason) for p in processes.problems] == [(p.file, p.reason) for p in threads.problems]
    assert any(p.file == "Positive/broken.jpg" for p in threads.problems)
    _assert_pixels_are_the_samples(processes, 32)
    assert data_module._OUTPUTS == {}  # the workers' view of each pixel array is let go


def _assert_pixels_are_the_samples(ds, size: int) -> None:
    """Row i of the pixels is sample i's file, decoded (skipped, merged and dropped files leave no gap)."""
    assert len(ds.pixels) == len(ds.samples)
    for sample, pixels in zip(ds.samples, ds.pixels):
        assert np.array_equal(pixels, load_patch(sample.path.read_bytes(), size)), sample.rel


FORKED_TORCH = """
import sys
import torch
from crackscan.data import load_dataset
from crackscan.runtime import parallel_map

def job(i):
    torch.ones(2_000_000).sin().sum()  # large enough to be split across threads
    return i

torch.ones(2_000_000).sin().sum()  # the parent has entered OpenMP before the workers fork
print(sum(parallel_map(job, list(range(4)), processes=True, chunksize=1)))
print(len(load_dataset(sys.argv[1], 32, quiet=True, processes=True).samples))
"""


@pytest.mark.parametrize("capability", ["default", None])
def test_forked_workers_survive_torch_threads(tmp_path, capability):
    # GNU OpenMP hangs in a child forked from a parent that used it, unless the child stays on one thread;
    # the decode workers run torch (the resize). ATEN_CPU_CAPABILITY=default is how PyTorch runs on CPUs
    # without AVX2, where its resize kernel is the generic, OpenMP-threaded one.
    root = make_dataset(tmp_path / "data", per_class=6)
    env = dict(os.environ)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    run = subprocess.run([sys.executable, "-c", FORKED_TORCH, str(root)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["6", "12"]


def test_a_class_with_no_readable_image_says_why_each_was_skipped(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=4)
    for path in (root / "Positive").iterdir():
        path.write_text("not a picture")
    with pytest.raises(DataError) as caught:
        load_dataset(root, 32, quiet=True)
    message = str(caught.value)
    assert message.startswith(f"{root / 'Positive'}: no readable images left in this class (4 skipped: ")
    assert "Positive/00001.jpg: not an image" in message and message.endswith("; ...)")
