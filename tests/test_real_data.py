"""Short training on the real Mendeley patches (when ../shared is present): block-held-out accuracy."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import IMAGENET_WEIGHTS, MENDELEY_DEV, require
from crackscan.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """Every 4th patch of each class, linked (not copied), with the matching rows of blocks.csv."""
    root = require(MENDELEY_DEV)
    require(IMAGENET_WEIGHTS)
    out = tmp_path_factory.mktemp("mendeley-subset")
    with open(root / "blocks.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    keep = rows[::4]
    for row in keep:
        target = out / row["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(root / row["file"])
    with open(out / "blocks.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["class", "file", "block"])
        writer.writeheader()
        writer.writerows(keep)
    return out


def test_short_training_reaches_99_percent_on_held_out_blocks(subset, tmp_path):
    code = main(["train", str(subset), "--weights", str(IMAGENET_WEIGHTS), "--out", str(tmp_path), "--name", "real",
                 "--head-epochs", "3", "--finetune-epochs", "1", "--views", "1", "--dense-mosaics", "12", "--quiet"])
    assert code == 0
    run = tmp_path / "real"
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert metrics["n"] > 500
    assert metrics["accuracy"] >= 0.99, metrics
    # The dense head, fitted on mosaics of real training patches, follows the crops on validation mosaics
    # better than the classifier's head averaged over each patch's cells.
    dense = json.loads((run / "model.json").read_text())["dense_head"]
    assert dense["mosaics"] == 12
    assert dense["val_cell_agreement"] > dense["val_cell_agreement_averaged_head"] + 0.02, dense
    # The split really held out whole blocks.
    with open(run / "split.csv") as handle:
        split_of_block = {}
        for r in csv.DictReader(handle):
            assert split_of_block.setdefault(r["group"], r["split"]) == r["split"]
