"""Accuracy against input size (and BatchNorm handling): how crackscan's defaults were chosen.

Trains `crackscan train` (defaults otherwise) at each size on the same block-held-out split of
../shared/data/mendeley-dev and reports validation and test accuracy, training wall time and
prediction throughput of the resulting model (decode included, ONNX Runtime).

    python benchmarks/input_size.py                       # 224 160 128 112 96; ~20 min on 2 cores, run alone
    python benchmarks/input_size.py --sizes 128 112 --quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import print_table, write_results  # noqa: E402
from train_speed import DATA, WEIGHTS, run_crackscan  # noqa: E402


def predict_rate(model_path: Path, files: list[Path]) -> float:
    from crackscan.model import load_model
    from crackscan.predict import predict_sources
    from crackscan.runtime import tune_allocator

    tune_allocator()
    model = load_model(model_path)
    list(predict_sources(model, files[:256]))  # warm-up: ONNX export/cache and thread pools
    t0 = time.perf_counter()
    n = sum(1 for _ in predict_sources(model, files))
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 160, 128, 112, 96])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--quick", action="store_true", help="1+1 epochs, 1 view: a smoke run")
    parser.add_argument("--batchnorm-size", type=int, default=128,
                        help="also train at this size with --batchnorm train, to compare with frozen BN (0: skip)")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"needs {args.data}")
    extra = ["--head-epochs", "1", "--finetune-epochs", "1", "--views", "1"] if args.quick else []
    files = sorted(args.data.glob("*/*.jpg"))[:: 4 if not args.quick else 40][:4000]
    rows = []
    runs = [(size, "frozen") for size in args.sizes]
    if args.batchnorm_size:
        runs.append((args.batchnorm_size, "train"))
    for size, batchnorm in runs:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"training at {size} px, BatchNorm {batchnorm} ...", flush=True)
            result = run_crackscan(args.data, args.weights, Path(tmp),
                                   ["--input-size", str(size), "--batchnorm", batchnorm, *extra])
            test = result["meta"]["metrics"]["test"]
            rows.append({
                "input_size": size,
                "batchnorm": batchnorm,
                "best_val_acc": round(max(float(r["val_acc"]) for r in result["history"]), 4),
                "test_acc": round(test["accuracy"], 4),
                "test_acc_ci": [round(v, 4) for v in test["accuracy_ci"]],
                "test_recall": round(test["recall"], 4),
                "train_wall_s": round(result["wall_s"], 1),
                "predict_img_per_s": round(predict_rate(Path(result["run"]) / "model.safetensors", files)),
            })
            print(rows[-1], flush=True)
    print_table(rows, ["input_size", "batchnorm", "best_val_acc", "test_acc", "test_acc_ci", "test_recall", "train_wall_s",
                       "predict_img_per_s"])
    write_results("input_size" + ("_quick" if args.quick else ""), rows, {"quick": args.quick})


if __name__ == "__main__":
    main()
