"""Patch throughput, JPEG decode included, against the plain way, in one run; plus the machine's limit.

Every configuration runs in a fresh process over the same 227x227 JPEG files (the Mendeley dev patches
when ../shared is present, generated concrete-like JPEGs otherwise), so that its peak RSS is its own
and the reference keeps glibc's default allocator (crackscan's ``mallopt`` setting is per process):

* reference: torchvision ``ImageFolder`` (PIL decode) + ``Resize(224)`` + ``ToTensor`` + ``Normalize``
  through a ``DataLoader`` (batch 32, no workers), eager MobileNetV2 at 224 px, default allocator;
* crackscan ``predict_sources`` with each backend (PyTorch eager channels_last, ONNX Runtime fp32,
  ONNX Runtime int8) at the model's input size (the given model's, or 128 without one; also 112), batch 64.

Models are prepared (and exported to ONNX) before any measuring process starts, so the figures and the
peak RSS are those of prediction alone. Without ``--model`` the network has random weights: speed does
not depend on their values. The last columns put each configuration's network FLOP/s against the
machine's measured fp32 GEMM rate (``benchmarks/gemm.py``). Run it alone: a second busy process on two
cores collapses PyTorch's throughput.

    python benchmarks/throughput.py                     # ~4 min on 2 cores
    python benchmarks/throughput.py --model run/model.safetensors --sizes 128
    python benchmarks/throughput.py --quick             # < 60 s smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import peak_rss_mb, print_table, write_results  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data" / "mendeley-dev"
CLASSES = ("Negative", "Positive")


def list_files(n: int, tmp: Path) -> tuple[Path, list[Path], str]:
    """An ImageFolder root and n 227x227 JPEGs in it: real patches when present, generated otherwise."""
    files = sorted(DATA.glob("*/*.jpg"))
    if files:
        step = max(1, len(files) // n)
        return DATA, files[::step][:n], f"{DATA} (1 in {step} files)"
    import numpy as np

    from crackscan.demo import concrete_patch

    rng = np.random.default_rng(0)
    root, out = tmp / "generated", []
    for i in range(n):
        path = root / CLASSES[i % 2] / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        concrete_patch(rng, 227, i % 2 == 1).save(path, quality=90)
        out.append(path)
    return root, out, "generated 227x227 JPEGs (quality 90)"


# ------------------------------------------------------------------------------------------------
# Preparation (in the parent, before any measuring process).


def prepare_models(model_path: Path | None, sizes: list[int], calib: list[Path], parity: list[Path],
                   tmp: Path) -> dict[int, dict]:
    """One model file per size, its fp32 graph in a private ONNX cache, and an int8 export beside it."""
    import torch

    from crackscan.export import OnnxRunner, export_onnx
    from crackscan.model import CrackModel, build_model, load_model, make_meta, save_model

    out = {}
    for size in sizes:
        if model_path:
            model = load_model(model_path)
            model.meta["input_size"] = size  # the network runs at any size; the speed is what is measured
        else:
            torch.manual_seed(0)
            model = CrackModel(build_model().eval(), make_meta(classes=list(CLASSES), crack_index=1, input_size=size))
        path = save_model(tmp / f"model-{size}.safetensors", model.module, model.meta)
        model = load_model(path)
        OnnxRunner.from_model(model)  # fills $XDG_CACHE_HOME (set to tmp by main) for the worker
        int8 = tmp / f"model-{size}.int8.onnx"
        report = export_onnx(model, int8, int8=True, calibration=calib, parity=parity)
        out[size] = {"model": str(path), "int8": str(int8), "int8_agreement": report.label_agreement,
                     "int8_max_abs_logit_diff": report.max_abs_logit_diff}
    return out


# ------------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON line.


def worker_reference(root: Path, files: list[Path], seconds: float) -> dict:
    """The plain way: ImageFolder + DataLoader(batch 32) + eager MobileNetV2 at 224 px."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms
    from torchvision.models import mobilenet_v2

    tf = transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    folder = datasets.ImageFolder(str(root), transform=tf)
    index = {Path(p).resolve(): i for i, (p, _) in enumerate(folder.samples)}
    subset = Subset(folder, [index[f.resolve()] for f in files])
    loader = DataLoader(subset, batch_size=32, shuffle=False, num_workers=0)
    model = mobilenet_v2(num_classes=2).eval()
    with torch.no_grad():
        model(next(iter(loader))[0])  # warm-up: first-call allocations, thread pool
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for images, _ in loader:
                model(images).softmax(1)
                n += len(images)
                if time.perf_counter() - t0 > seconds:
                    break
    return {"images": n, "seconds": time.perf_counter() - t0}


def worker_crackscan(files: list[Path], seconds: float, model_path: str, backend: str, int8: str | None,
                     batch: int) -> dict:
    """crackscan's way: predict_sources (threaded decode at the input size) with one backend."""
    from crackscan.runtime import tune_allocator

    tune_allocator()  # what the CLI does at start
    from crackscan.model import load_model
    from crackscan.predict import predict_sources

    # An int8 export is itself a model file (ONNX Runtime only), as `crackscan predict model.int8.onnx` loads it.
    model = load_model(int8 or model_path)
    list(predict_sources(model, files[:batch], batch_size=batch, backend=backend))  # warm-up
    n, t0 = 0, time.perf_counter()
    # Round and round the files until time is up (the OS page cache holds them either way).
    for n, _ in enumerate(predict_sources(model, itertools.cycle(files), batch_size=batch, backend=backend), 1):
        if n % batch == 0 and time.perf_counter() - t0 > seconds:
            break
    return {"images": n, "seconds": time.perf_counter() - t0}


def run_worker(spec: dict, env: dict) -> dict:
    """Run one measurement in a fresh interpreter; return its JSON result."""
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec['kind']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker_main(spec: dict) -> None:
    files = [Path(f) for f in spec["files"]]
    if spec["kind"] == "reference":
        result = worker_reference(Path(spec["root"]), files, spec["seconds"])
    else:
        result = worker_crackscan(files, spec["seconds"], spec["model"], spec["backend"], spec.get("int8"),
                                  spec["batch"])
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a crackscan model file (default: random weights)")
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="crackscan input sizes (default: 128 112, or the model's size and 112)")
    parser.add_argument("--files", type=int, default=2000, help="number of JPEG files (default 2000)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring time per configuration (default 15)")
    parser.add_argument("--batch", type=int, default=64, help="crackscan batch size (default 64, predict's)")
    parser.add_argument("--quick", action="store_true", help="256 files, 1.5 s each, first size only: a smoke run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    if args.model and not args.model.is_file():
        sys.exit(f"error: {args.model}: no such model file")
    if args.sizes is None:
        from crackscan.model import read_meta

        first = int(read_meta(args.model)["input_size"]) if args.model else 128
        args.sizes = [first] + ([112] if first != 112 else [])
    if args.quick:
        args.files, args.seconds, args.sizes = 256, 1.5, args.sizes[:1]
    load_at_start, started = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")  # the workers find the fp32 graph here
        root, files, data = list_files(args.files, tmp)
        calib, parity = files[1::7][: 16 if args.quick else 128], files[4::7][: 16 if args.quick else 64]
        print(f"{len(files)} files from {data}; preparing models ...", flush=True)
        prepared = prepare_models(args.model, args.sizes, calib, parity, tmp)
        common = {"files": [str(f) for f in files], "seconds": args.seconds}
        configs = [("reference: ImageFolder + eager 224, default malloc", 224,
                    {"kind": "reference", "root": str(root)})]
        for size in args.sizes:
            for backend, int8 in (("torch", None), ("onnx", None), ("onnx", prepared[size]["int8"])):
                name = f"crackscan {backend}{' int8' if int8 else ''} {size}px"
                configs.append((name, size, {"kind": "crackscan", "model": prepared[size]["model"],
                                             "backend": backend, "int8": int8, "batch": args.batch}))
        rows = []
        for name, size, spec in configs:
            print(f"[{time.perf_counter() - started:5.1f} s] measuring {name} ...", flush=True)
            env = dict(os.environ)
            if spec["kind"] == "reference":
                env["CRACKSCAN_NO_MALLOC_TUNING"] = "1"  # belt and braces: the reference never calls it anyway
            result = run_worker({**spec, **common}, env)
            rows.append({"configuration": name, "input_px": size, "images_per_s": result["images"] / result["seconds"],
                         "peak_rss_mb": round(result["peak_rss_mb"])})
    from gemm import fp32_limit, gemm_rates, mobilenet_flops

    print(f"[{time.perf_counter() - started:5.1f} s] measuring the machine's GEMM rate ...", flush=True)
    machine = gemm_rates(args.quick)
    peak = fp32_limit(machine)
    base = rows[0]["images_per_s"]
    flops = {size: mobilenet_flops(size) for size in {row["input_px"] for row in rows}}
    for row in rows:
        row["x_reference"] = row["images_per_s"] / base
        row["net_gflops"] = row["images_per_s"] * flops[row["input_px"]] / 1e9
        row["fraction_of_fp32_gemm"] = row["net_gflops"] / peak
    print_table(rows, ["configuration", "input_px", "images_per_s", "x_reference", "peak_rss_mb", "net_gflops",
                       "fraction_of_fp32_gemm"])
    print("GEMM:", ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in machine.items()))
    int8 = {size: {k: v for k, v in p.items() if k.startswith("int8_")} for size, p in prepared.items()}
    write_results("throughput" + ("_quick" if args.quick else ""), rows, {
        "data": data,
        "files": len(files),
        "model": str(args.model) if args.model else "random weights (speed does not depend on them)",
        "crackscan_batch": args.batch,
        "seconds_per_configuration": args.seconds,
        "decode": "included: every image is read and decoded from JPEG in every pass",
        "int8_parity": int8,  # on some of the files, disjoint from the calibration files
        "mflops_per_image": {size: f / 1e6 for size, f in flops.items()},
        "gemm": machine,
        "load_average_at_start": load_at_start,
        "wall_s": time.perf_counter() - started,
        "note": "run alone: a second busy process collapses PyTorch throughput on 2 cores",
    })


if __name__ == "__main__":
    main()
