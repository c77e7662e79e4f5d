"""What a user waits for with `crackscan scan`: a folder of 12-MP photos, and one photo from a cold start.

benchmarks/scan.py times the scan itself (decode plus map). A user of the command also waits for the
outputs (overlay, map PNG, JSON, summary, contact sheet) and, once per command, for Python to import
torch and torchvision, load the model and warm ONNX Runtime up. Rows, all on the same photos in one run:

* scan only (the reference): `scan_photo` per photo in a warm process;
* scan with all outputs: `scan_paths` over the folder in the same warm process, per photo;
* the command on the folder, per photo, and on one photo: `crackscan scan` in a fresh process, wall
  time, everything included;
* `crackscan --help`: what starting the command costs before it imports torch.

The folder holds --photos copies (links) of the two real photos in ../shared/data/photos when present,
else of a generated 4032x3024 JPEG.

    python benchmarks/batch.py                 # 8 photos
    python benchmarks/batch.py --photos 4
    python benchmarks/batch.py --quick         # smoke run: 2 photos
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
PHOTOS = HERE.parent.parent / "shared" / "data" / "photos"


def photo_folder(folder: Path, count: int) -> list[Path]:
    """``count`` links to the real photos (alternating), or to one generated 12-MP JPEG."""
    sources = sorted(PHOTOS.glob("*.jpg")) if PHOTOS.is_dir() else []
    if not sources:
        from scan import generated_photo  # benchmarks/scan.py (this folder is on sys.path)

        sources = [generated_photo(folder / "generated.jpg", 4032, 3024)]
    paths = []
    for index in range(count):
        link = folder / "photos" / f"{index:02d}-{sources[index % len(sources)].name}"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(sources[index % len(sources)].resolve())
        paths.append(link)
    return paths


def command(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "crackscan.cli", *args], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=8, help="photos in the folder (default 8)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 photos")
    args = parser.parse_args()
    count = 2 if args.quick else max(2, args.photos)

    from crackscan.model import load_model
    from crackscan.runtime import tune_allocator
    from crackscan.scan import scan_paths, scan_photo

    tune_allocator()
    model = load_model()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = photo_folder(tmp, count)
        names = sorted({path.resolve().name for path in paths})
        scan_paths(model, paths[:1], tmp / "warm-up", quiet=True)  # sessions, buffers, lazy imports

        started = time.perf_counter()
        for path in paths:
            scan_photo(model, path)
        reference = (time.perf_counter() - started) / count
        rows.append({"case": "scan only (scan_photo, warm)", "seconds_per_photo": round(reference, 3),
                     "vs_scan_only": 1.0})

        started = time.perf_counter()
        scan_paths(model, paths, tmp / "outputs", quiet=True)
        outputs = (time.perf_counter() - started) / count
        rows.append({"case": "scan with all outputs (scan_paths, warm)", "seconds_per_photo": round(outputs, 3),
                     "vs_scan_only": round(outputs / reference, 2)})

        folder = command(["scan", str(paths[0].parent), "--out", str(tmp / "cli-folder"), "--quiet"])
        rows.append({"case": f"crackscan scan FOLDER ({count} photos, fresh process)",
                     "seconds_per_photo": round(folder / count, 3), "seconds": round(folder, 2),
                     "vs_scan_only": round(folder / count / reference, 2)})
        one = command(["scan", str(paths[0]), "--out", str(tmp / "cli-one"), "--quiet"])
        rows.append({"case": "crackscan scan PHOTO (fresh process)", "seconds_per_photo": round(one, 3),
                     "seconds": round(one, 2), "vs_scan_only": round(one / reference, 2)})
        rows.append({"case": "crackscan --help (fresh process)", "seconds": round(command(["--help"]), 2)})

    print(f"\nmodel: {model.path}; {count} photos, links to {', '.join(names)}")
    print_table(rows, ["case", "seconds_per_photo", "seconds", "vs_scan_only"])
    write_results("batch_quick" if args.quick else "batch", rows, {"photos": count, "photo_files": names})


if __name__ == "__main__":
    main()
