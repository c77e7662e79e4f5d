"""Whole-photo scan speed and memory: dense (one pass of the base) against crop-by-crop, same map.

For a 12-MP photo (../shared/data/photos/floor-crack-4032x3024.jpg when present, else a generated
4032x3024 one) it times `scan_photo` with method "dense" (the default: one pass of the base, then the
model's dense head at every cell), "dense" with up to 256 crops verifying the flagged regions' borders,
"dense" with the base in PyTorch's tiles instead of one ONNX Runtime pass (what photos over
``scan.WHOLE_PASS_PIXELS`` get), the map without the dense head (the classifier's head averaged over each
patch's cells: verified by 256 crops, scan's default before the dense head, and raw), and "crops" (with the
default backend, ONNX Runtime, and with PyTorch), at the same output stride (the network's own: 32
network px), decode included, and compares the dense maps with the crops' map: Pearson r of probabilities
and of logits, largest difference, share of cells with the same label at the scan's threshold. Each
measurement runs in a fresh process so its peak memory (VmHWM) is its own; the table shows the
process's resident memory before the scan (torch and the model) and the peak during it. A generated
50-MP photo measures memory for big photos. Dense runs are repeated (5 by default) and crops run twice;
the fastest run counts, and the first (cold: sessions and buffers set up) is shown beside it.

Goal (issue 4): dense 12-MP <= 1 s on 2 cores decode included, >= 5x faster than crops.

    python benchmarks/scan.py                    # shipped model (or ImageNet base + random head), 2 threads
    python benchmarks/scan.py --model RUN/model.safetensors --threads 2
    python benchmarks/scan.py --quick            # smoke run, < 60 s: smaller photo, no 50-MP case
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb, scan_options, variant_model, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
PHOTO = SHARED / "data" / "photos" / "floor-crack-4032x3024.jpg"
IMAGENET = SHARED / "weights" / "mobilenet_v2_imagenet1k.safetensors"
RESULTS = HERE / "results"


def stand_in_model(path: Path, input_size: int) -> Path:
    """ImageNet base (random base when absent) + random head: right speed and memory, meaningless map."""
    import torch

    from crackscan.model import build_model, load_pretrained_base, make_meta, save_model

    torch.manual_seed(0)
    module = build_model()
    base = load_pretrained_base(module, IMAGENET if IMAGENET.exists() else None)
    torch.nn.init.normal_(module.classifier[1].weight, 0, 0.05)
    meta = make_meta(classes=["Negative", "Positive"], crack_index=1, input_size=input_size,
                     note=f"benchmark stand-in: base {base}, random head")
    return save_model(path, module.eval(), meta)


def generated_photo(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A concrete-like JPEG with a few dark cracks, built from a coarse noise field (fast at 50 MP)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    coarse = rng.normal(165, 14, (height // 16, width // 16)).clip(0, 255).astype(np.uint8)
    grey = Image.fromarray(coarse, "L").resize((width, height), Image.Resampling.BILINEAR)
    grain = Image.effect_noise((width, height), 18).filter(ImageFilter.BoxBlur(1))
    image = Image.merge("RGB", [Image.blend(grey, grain, 0.25)] * 3)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = int(rng.integers(0, width)), 0
        points = [(x, y)]
        while y < height:
            x += int(rng.integers(-width // 60, width // 60 + 1))
            y += int(rng.integers(height // 40, height // 15))
            points.append((x, y))
        draw.line(points, fill=(45, 45, 45), width=max(3, width // 600))
    image.save(path, quality=90)
    return path


def worker(model_path: str, photo: str, method: str, repeats: int, threads: int, map_out: str | None) -> None:
    """One measurement in this process: prints a JSON line."""
    import numpy as np
    import torch

    from crackscan.model import load_model
    from crackscan.runtime import tune_allocator
    from crackscan.scan import scan_photo

    tune_allocator()
    torch.set_num_threads(threads)
    model = variant_model(load_model(model_path), method)
    model.crack_probability(np.zeros((2, model.input_size, model.input_size, 3), np.uint8), backend="torch")
    with open("/proc/self/status") as handle:
        before_mb = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS")) / 1024
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = scan_photo(model, photo, **scan_options(method))
        times.append(time.perf_counter() - started)
    if map_out:
        np.save(map_out, result.probability)
    print(json.dumps({
        "method": method,
        "seconds": min(times),
        "seconds_all": [round(t, 3) for t in times],
        "map_shape": list(result.map_shape),
        "stride_photo_px": round(result.stride, 2),
        "verdict": result.label,
        "flagged_fraction": round(result.flagged_fraction, 4),
        "verified_cells": result.verified,
        "rejected_cells": result.rejected,
        "threshold": result.threshold,
        "rss_before_mb": round(before_mb),
        "peak_rss_mb": round(peak_rss_mb()),
    }))


def measure(model: Path, photo: Path, method: str, repeats: int, threads: int, map_out: Path | None) -> dict:
    command = [sys.executable, __file__, "--worker", str(model), str(photo), method, str(repeats), str(threads),
               str(map_out or "")]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"worker failed ({method}, {photo.name}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement(dense, crops, threshold: float) -> dict:
    import numpy as np

    def logit(p):
        p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
        return np.log(p / (1 - p))

    return {
        "pearson_r": round(float(np.corrcoef(dense.ravel(), crops.ravel())[0, 1]), 4),
        "pearson_r_logits": round(float(np.corrcoef(logit(dense).ravel(), logit(crops).ravel())[0, 1]), 4),
        "max_abs_diff": round(float(np.abs(dense - crops).max()), 4),
        "mean_abs_diff": round(float(np.abs(dense - crops).mean()), 4),
        "label_agreement": round(float(((dense >= threshold) == (crops >= threshold)).mean()), 4),
        "dense_flagged": round(float((dense >= threshold).mean()), 4),
        "crops_flagged": round(float((crops >= threshold).mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model file (default: the shipped model, else a stand-in)")
    parser.add_argument("--photo", type=Path, help="12-MP photo (default: the floor photo, else generated)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the issue's goal)")
    parser.add_argument("--repeats", type=int, default=5, help="dense runs; the fastest counts (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a 1200x900 photo, no 50-MP case")
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7] or None)
        return
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    from crackscan.model import default_model_path

    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or (default_model_path() if default_model_path().is_file() else None)
        model_note = str(model) if model else "stand-in: ImageNet base + random head, input 128 (maps meaningless)"
        if model is None:
            model = stand_in_model(tmp / "stand-in.safetensors", 128)
        photo = args.photo or (PHOTO if PHOTO.is_file() else generated_photo(tmp / "photo-12mp.jpg", 4032, 3024))
        if args.quick:
            small = Image.open(photo)
            small.thumbnail((1200, 1200))
            photo = tmp / "photo-quick.jpg"
            small.save(photo, quality=92, exif=Image.open(args.photo or PHOTO).getexif() if PHOTO.is_file() else b"")
        size = Image.open(photo).size
        print(f"model: {model_note}\nphoto: {photo.name} {size[0]}x{size[1]}, {args.threads} threads", flush=True)

        dense = measure(model, photo, "dense", args.repeats, args.threads, tmp / "dense.npy")
        verified = measure(model, photo, "dense-verify-256", args.repeats, args.threads, tmp / "verified.npy")
        tiled = measure(model, photo, "dense-tiled", args.repeats, args.threads, None)
        averaged = measure(model, photo, "averaged-dense-verify-256", args.repeats, args.threads, tmp / "averaged.npy")
        averaged_raw = measure(model, photo, "averaged-dense-raw", args.repeats, args.threads, tmp / "averaged-raw.npy")
        # Twice, so that crops too are timed warm, as the dense runs are (the first run of each pays start-up).
        crops = measure(model, photo, "crops", 2, args.threads, tmp / "crops.npy")
        crops_torch = measure(model, photo, "crops-torch", 2, args.threads, None)
        agree = {name: agreement(np.load(tmp / f"{name}.npy"), np.load(tmp / "crops.npy"), dense["threshold"])
                 for name in ("dense", "verified", "averaged", "averaged-raw")}
        mp = f"{size[0] * size[1] / 1e6:.0f}-MP"
        rows = [dict(case=f"{mp} dense (default)", **dense), dict(case=f"{mp} dense, --verify 256", **verified),
                dict(case=f"{mp} dense, PyTorch tiles", **tiled),
                dict(case=f"{mp} averaged head, verified", **averaged),
                dict(case=f"{mp} averaged head, raw", **averaged_raw),
                dict(case=f"{mp} crops", **crops),
                dict(case=f"{mp} crops, PyTorch", **crops_torch)]
        if not args.quick:
            big = generated_photo(tmp / "photo-50mp.jpg", 8160, 6120)
            rows.append(dict(case="50-MP dense (generated)", **measure(model, big, "dense", 1, args.threads, None)))

    speedup = crops["seconds"] / dense["seconds"]
    speedups = {"dense_vs_crops": round(speedup, 2),
                "dense_vs_crops_torch": round(crops_torch["seconds"] / dense["seconds"], 2),
                "dense_verified_vs_crops": round(crops["seconds"] / verified["seconds"], 2),
                "dense_tiled_vs_crops": round(crops["seconds"] / tiled["seconds"], 2),
                "averaged_verified_vs_crops": round(crops["seconds"] / averaged["seconds"], 2),
                "averaged_raw_vs_crops": round(crops["seconds"] / averaged_raw["seconds"], 2)}
    print(f"\n{'case':<32}{'seconds':>9}{'first run':>11}{'map':>10}{'stride px':>11}{'RSS before':>12}"
          f"{'peak RSS':>10}")
    for row in rows:
        shape = "x".join(map(str, row["map_shape"]))
        print(f"{row['case']:<32}{row['seconds']:>9.3f}{row['seconds_all'][0]:>11.3f}{shape:>10}"
              f"{row['stride_photo_px']:>11}{row['rss_before_mb']:>10} MB{row['peak_rss_mb']:>7} MB")
    print(f"\nspeed-up dense (default) vs crops: {speedup:.1f}x (goal >= 5x); dense 12-MP goal <= 1 s")
    print("all speed-ups: " + ", ".join(f"{k} {v}x" for k, v in speedups.items()))
    for name, values in agree.items():
        print(f"map agreement with crops, {name + ':':<14}" + ", ".join(f"{k} {v}" for k, v in values.items()))
    report = {
        "quick": args.quick,
        "model": model_note,
        "photo": {"name": Path(str(args.photo or PHOTO)).name if not args.quick else "quick 1200-px copy",
                  "size": list(size)},
        "threads": args.threads,
        "speedup_dense_vs_crops": round(speedup, 2),
        "speedups": speedups,
        "agreement": agree,
        "goal": "dense 12-MP <= 1 s on 2 cores decode included; >= 5x faster than crops",
    }
    write_results("scan_quick" if args.quick else "scan", rows, report)  # with the command, time and machine


if __name__ == "__main__":
    main()
