"""The machine's limit: measured GEMM rates on these cores, and MobileNetV2 inference as a fraction of them.

A large square matrix product is the fastest thing these cores do; a network's forward pass can only
approach it. This script measures it (fp32: torch.mm and numpy; int8: torch._int_mm and ONNX Runtime's
MatMulInteger), counts MobileNetV2's FLOPs per image (torch.utils.flop_counter, 2 per multiply-add,
convolutions and the classifier only), and times the bare forward pass (no decoding; batch 64; random
weights, since speed does not depend on their values) with each crackscan backend, so that

    fraction = images/s x FLOPs per image / GEMM FLOP/s

says how much of the machine the network uses. MobileNetV2's depthwise convolutions move far more bytes
per FLOP than a GEMM, so a fraction well below 1 is expected. Run it alone: a second busy process halves
every figure.

    python benchmarks/gemm.py            # ~1.5 min on 2 cores
    python benchmarks/gemm.py --quick    # ~30 s smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import print_table, write_results  # noqa: E402


def mobilenet_flops(size: int) -> float:
    """Floating-point operations (2 per multiply-add) of one MobileNetV2 forward at size x size."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from crackscan.model import build_model

    model = build_model().eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def _rate(run: Callable[[], object], ops_per_call: float, seconds: float) -> float:
    """Operations per second of ``run()``: one warm-up call, then as many calls as fit in ``seconds``."""
    run()
    reps, t0 = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - t0 < seconds:
        run()
        reps += 1
    return ops_per_call * reps / (time.perf_counter() - t0)


def _ort_matmul_integer(n: int):
    """An ONNX Runtime session computing one uint8 x int8 -> int32 n x n product, and its feed."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from crackscan.runtime import cpu_count

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "gemm",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("B", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_count()
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"A": rng.integers(0, 256, (n, n), dtype=np.uint8), "B": rng.integers(-127, 128, (n, n), dtype=np.int8)}
    return session, feed


def fp32_limit(machine: dict[str, float | str]) -> float:
    """The machine's fp32 limit: the faster of the two measured GEMMs (numpy's BLAS beat torch.mm here)."""
    return max(float(machine["fp32_torch_gflops"]), float(machine["fp32_numpy_gflops"]))


def gemm_rates(quick: bool = False) -> dict[str, float | str]:
    """Measured GEMM rates on this machine, in G(FL)OP/s.

    Keys: ``fp32_torch_gflops``, ``fp32_numpy_gflops``, ``int8_torch_gops`` (torch._int_mm),
    ``int8_onnxruntime_gops`` (MatMulInteger), ``matrix_n``; an int8 one that cannot run here is
    replaced by ``<key>_error``.
    """
    import torch

    n, seconds = (1024, 0.5) if quick else (2048, 2.0)
    ops = 2.0 * n**3
    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    out: dict[str, float | str] = {"matrix_n": n}
    out["fp32_torch_gflops"] = _rate(lambda: torch.mm(a, b), ops, seconds) / 1e9
    out["fp32_numpy_gflops"] = _rate(lambda: an @ bn, ops, seconds) / 1e9
    try:
        ai = torch.randint(-128, 128, (n, n), dtype=torch.int8)
        bi = torch.randint(-128, 128, (n, n), dtype=torch.int8)
        out["int8_torch_gops"] = _rate(lambda: torch._int_mm(ai, bi), ops, seconds) / 1e9
    except (RuntimeError, AttributeError) as err:  # a private op: absent or CPU-less in some builds
        out["int8_torch_gops_error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    try:
        session, feed = _ort_matmul_integer(n)
        out["int8_onnxruntime_gops"] = _rate(lambda: session.run(None, feed), ops, seconds) / 1e9
    except Exception as err:  # onnxruntime missing or without the kernel: the rest of the report still holds
        out["int8_onnxruntime_gops_error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return out


def forward_rates(size: int, seconds: float, batch: int = 64) -> dict[str, float]:
    """Bare forward images/s (no decoding) of MobileNetV2 at ``size`` with torch eager, ORT fp32 and ORT int8."""
    import numpy as np
    import torch

    from crackscan.demo import concrete_patch
    from crackscan.export import OnnxRunner, export_onnx
    from crackscan.model import CrackModel, build_model, make_meta

    torch.manual_seed(0)
    module = build_model().eval().to(memory_format=torch.channels_last)
    model = CrackModel(module=module, meta=make_meta(classes=["Negative", "Positive"], crack_index=1, input_size=size))
    rng = np.random.default_rng(0)
    pixels = np.stack([np.asarray(concrete_patch(rng, size, i % 2 == 0)) for i in range(batch)])
    rates = {"torch eager": _rate(lambda: model.logits(pixels), batch, seconds)}
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "fp32.onnx")
        export_onnx(model, Path(tmp) / "int8.onnx", int8=True, calibration=[_png(p) for p in pixels[:32]])
        for name, file in (("onnxruntime fp32", "fp32.onnx"), ("onnxruntime int8", "int8.onnx")):
            runner = OnnxRunner.from_file(Path(tmp) / file)
            rates[name] = _rate(lambda: runner.logits(pixels), batch, seconds)
    return rates


def _png(pixels) -> bytes:
    """An image file's bytes: export_onnx takes image sources, as the CLI gives it."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 128, 112, 96],
                        help="input sizes to time the forward pass at (default 224 128 112 96)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per backend and size")
    parser.add_argument("--quick", action="store_true", help="smaller matrices, 128 px only, 1 s each")
    args = parser.parse_args()
    from crackscan.runtime import tune_allocator

    tune_allocator()  # crackscan's own setting for its processes; GEMM rates do not depend on it
    if args.quick:
        args.sizes, args.seconds = [128], 1.0
    machine = gemm_rates(args.quick)
    fp32_peak = fp32_limit(machine)
    int8_peak = machine.get("int8_onnxruntime_gops")
    rows = []
    for size in args.sizes:
        flops = mobilenet_flops(size)
        print(f"timing the forward pass at {size} px ...", flush=True)
        for backend, rate in forward_rates(size, args.seconds).items():
            gflops = rate * flops / 1e9
            rows.append({
                "backend": backend,
                "input_px": size,
                "mflops_per_image": flops / 1e6,
                "images_per_s": rate,
                "net_gflops": gflops,
                "fraction_of_fp32_gemm": gflops / fp32_peak,
                # int8 work is compared with the int8 GEMM it runs on
                "fraction_of_int8_gemm": gflops / float(int8_peak) if "int8" in backend and int8_peak else None,
            })
    print_table(rows, ["backend", "input_px", "mflops_per_image", "images_per_s", "net_gflops",
                       "fraction_of_fp32_gemm", "fraction_of_int8_gemm"])
    print("GEMM:", ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in machine.items()))
    write_results("gemm" + ("_quick" if args.quick else ""), rows, {
        "gemm": machine,
        "flops": "torch.utils.flop_counter.FlopCounterMode: 2 per multiply-add, convolutions and linear layers",
        "forward": "bare forward pass, no decoding, batch 64, random weights, crackscan's allocator setting",
        "threads": os.environ.get("OMP_NUM_THREADS", "default (all usable cores)"),
        "note": "run alone: a second busy process collapses throughput on 2 cores",
    })


if __name__ == "__main__":
    main()
