"""What every benchmark script shares: a plain-text table on screen and a JSON file of the same rows."""

from __future__ import annotations

import json
import platform
import resource
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Where a figure was measured: it only means something next to this."""
    import torch

    from crackscan.runtime import cpu_count, cpu_name

    return {"cpu": cpu_name(), "cores": cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if value is None:
        return "-"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Rows as an aligned text table (also valid Markdown)."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
    sys.stdout.flush()


def write_results(name: str, rows: Sequence[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    """benchmarks/results/NAME.json with the rows, the command line, the time and the machine."""
    RESULTS.mkdir(exist_ok=True)
    doc = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "rows": list(rows),
        **(extra or {}),
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started, imports and model included.

    ``getrusage().ru_maxrss`` would be wrong here: Linux carries a forked child's high-water mark over
    ``exec``, so every worker would report at least the (large) parent's peak. The kernel's ``VmHWM``
    belongs to the new address space only.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; outside Linux, no fork issue


def scan_options(variant: str) -> dict[str, Any]:
    """Keyword arguments of a scan for a benchmark variant: "dense" (scan's default: with a dense head, its
    map as it is; without, borders verified by crops), "dense-raw" (no verification), "dense-verify-N" (at
    most N verification crops), "crops" (every patch classified alone, with the default backend: ONNX
    Runtime when installed) or "crops-torch" (the same in PyTorch); "dense-tiled" is the default with the
    dense pass in PyTorch's tiles (what photos too large for one ONNX Runtime pass get), "dense-raw-tiled"
    the raw map so. An "averaged-" prefix is for :func:`variant_model` and does not change the options."""
    variant = variant.removeprefix("averaged-")
    if variant == "crops-torch":
        return {"method": "crops", "backend": "torch"}
    if variant == "dense-tiled":
        return {"method": "dense", "whole_pass_pixels": 0}
    if variant == "dense-raw-tiled":
        return {"method": "dense", "verify": 0, "whole_pass_pixels": 0}
    if variant == "dense-raw":
        return {"method": "dense", "verify": 0}
    if variant.startswith("dense-verify-"):
        return {"method": "dense", "verify": int(variant.rsplit("-", 1)[1])}
    return {"method": variant}


def variant_model(model: Any, variant: str) -> Any:
    """The model a benchmark variant scans with: "averaged-..." variants drop the dense head, so the map is
    the classifier's own head averaged over each patch's cells (and verified by default), as before the
    dense head existed; other variants use the model as it is."""
    if not variant.startswith("averaged-") or model.dense_head is None:
        return model
    import copy

    from crackscan.model import CrackModel

    module = copy.deepcopy(model.module)
    del module.dense_head
    return CrackModel(module=module, meta=dict(model.meta), path=model.path)
