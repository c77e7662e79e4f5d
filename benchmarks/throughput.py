"""Patch throughput, JPEG decode included, against the plain way, in one run; plus the machine's limit.

Every configuration runs in a fresh process (so peak RSS is its own, and the reference keeps glibc's
default allocator) over the same 227x227 JPEG files:

* reference: PIL open + convert, torchvision Resize(224) + ToTensor + Normalize one image at a time,
  eager MobileNetV2 at 224 px, batch 32, default allocator (the notebook way);
* crackscan ``predict_sources`` with each backend (PyTorch eager channels_last, ONNX Runtime fp32,
  ONNX Runtime int8) at the model's input size (128 by default, also 112).

It also measures fp32 (and int8) GEMM throughput on these cores and reports each configuration's
network FLOP/s as a fraction of it.

    python benchmarks/throughput.py            # ~3 min on 2 cores; run it alone
    python benchmarks/throughput.py --quick    # ~40 s smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import print_table, write_results  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data" / "mendeley-dev"


def list_files(n: int, tmp: Path) -> list[Path]:
    """n 227x227 JPEGs: real patches when the dev data is present, generated otherwise."""
    files = sorted(DATA.glob("*/*.jpg"))
    if files:
        step = max(1, len(files) // n)
        return files[::step][:n]
    from crackscan.demo import concrete_patch
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = tmp / f"{i:05d}.jpg"
        concrete_patch(rng, 227, i % 2 == 0).save(path, quality=90)
        out.append(path)
    return out


def mobilenet_flops(size: int) -> float:
    """Floating-point operations (2 per multiply-add) of one MobileNetV2 forward at size x size."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2().eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def _gops(run, n: int, seconds: float) -> float:
    """Giga-operations per second of an n x n x n matrix product ``run()``, after a warm-up call."""
    run()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def gemm_gflops(quick: bool) -> dict[str, float]:
    """Measured fp32 GEMM (torch and numpy) and int8 GEMM (ONNX Runtime MatMulInteger) GFLOP/s."""
    import numpy as np
    import torch

    n, seconds = (1024, 1.0) if quick else (2048, 3.0)
    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    out = {
        "fp32_torch_gflops": _gops(lambda: torch.mm(a, b), n, seconds),
        "fp32_numpy_gflops": _gops(lambda: an @ bn, n, seconds),
    }
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g",
            [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n]),
             helper.make_tensor_value_info("B", TensorProto.INT8, [n, n])],
            [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feed = {"A": np.random.randint(0, 255, (n, n), dtype=np.uint8),
                "B": np.random.randint(-127, 127, (n, n), dtype=np.int8)}
        out["int8_onnxruntime_gops"] = _gops(lambda: session.run(None, feed), n, seconds)
    except Exception as err:  # int8 GEMM is a nicety of the report
        out["int8_error"] = f"{type(err).__name__}: {err}"
    return out


# ------------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON line.


def worker_reference(files: list[Path], seconds: float) -> dict:
    import torch
    from PIL import Image
    from torchvision import transforms
    from torchvision.models import mobilenet_v2

    tf = transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    model = mobilenet_v2(num_classes=2).eval()

    def batches():
        while True:
            for i in range(0, len(files) - 31, 32):
                yield files[i : i + 32]

    with torch.no_grad():
        model(torch.stack([tf(Image.open(f).convert("RGB")) for f in files[:32]]))  # warm-up
        n, t0 = 0, time.perf_counter()
        for chunk in batches():
            model(torch.stack([tf(Image.open(f).convert("RGB")) for f in chunk])).softmax(1)
            n += len(chunk)
            if time.perf_counter() - t0 > seconds:
                break
    return {"images": n, "seconds": time.perf_counter() - t0}


def worker_crackscan(files: list[Path], seconds: float, size: int, backend: str, int8: bool, calib: list[Path]) -> dict:
    from crackscan.export import OnnxRunner, export_onnx
    from crackscan.model import CrackModel, build_model, make_meta
    from crackscan.predict import predict_sources
    from crackscan.runtime import tune_allocator

    tune_allocator()
    import torch

    torch.manual_seed(0)  # speed does not depend on the weights' values
    module = build_model().eval().to(memory_format=torch.channels_last)
    model = CrackModel(module=module, meta=make_meta(classes=["Negative", "Positive"], crack_index=1, input_size=size))
    if int8:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "q.onnx"
            export_onnx(model, path, int8=True, calibration=calib)
            model._onnx = OnnxRunner.from_file(path)
    list(predict_sources(model, files[:256], backend=backend))  # warm-up: export, threads, allocator
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += sum(1 for _ in predict_sources(model, files, backend=backend))
    return {"images": n, "seconds": time.perf_counter() - t0}


def run_worker(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000, help="number of JPEG files (default 2000)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring time per configuration")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 112])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker[0])
        files = [Path(f) for f in spec["files"]]
        if spec["kind"] == "reference":
            result = worker_reference(files, spec["seconds"])
        else:
            result = worker_crackscan(files, spec["seconds"], spec["size"], spec["backend"], spec["int8"],
                                      [Path(f) for f in spec["calib"]])
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    if args.quick:
        args.files, args.seconds, args.sizes = 300, 3.0, [128]
    with tempfile.TemporaryDirectory() as tmp:
        files = [str(f) for f in list_files(args.files, Path(tmp))]
        calib = files[1::7][:128]
        configs = [("reference: eager 224, PIL+torchvision, default malloc", {"kind": "reference"}, 224)]
        for size in args.sizes:
            for backend, int8 in (("torch", False), ("onnx", False), ("onnx", True)):
                name = f"crackscan {backend}{' int8' if int8 else ''} {size}px"
                configs.append((name, {"kind": "crackscan", "backend": backend, "int8": int8, "size": size}, size))
        rows = []
        env_plain = dict(os.environ, CRACKSCAN_NO_MALLOC_TUNING="1")
        for name, spec, size in configs:
            spec.update(files=files, seconds=args.seconds, calib=calib)
            print(f"measuring {name} ...", flush=True)
            result = run_worker([json.dumps(spec)], env=env_plain if spec["kind"] == "reference" else None)
            rate = result["images"] / result["seconds"]
            rows.append({"configuration": name, "input_px": size, "images_per_s": rate,
                         "peak_rss_mb": round(result["peak_rss_mb"])})
    base = rows[0]["images_per_s"]
    machine = gemm_gflops(args.quick)
    peak = machine["fp32_torch_gflops"]
    for row in rows:
        row["x_reference"] = row["images_per_s"] / base
        flops = mobilenet_flops(row["input_px"])
        row["net_gflops"] = row["images_per_s"] * flops / 1e9
        row["fraction_of_fp32_gemm"] = row["net_gflops"] / peak
    print_table(rows, ["configuration", "input_px", "images_per_s", "x_reference", "peak_rss_mb", "net_gflops",
                       "fraction_of_fp32_gemm"])
    print("machine:", ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in machine.items()))
    write_results("throughput" + ("_quick" if args.quick else ""), rows, {
        "gemm": machine, "files": len(files), "decode": "included: every image is read and decoded from JPEG",
        "note": "run alone: a second busy process collapses PyTorch throughput on 2 cores",
    })


if __name__ == "__main__":
    main()
