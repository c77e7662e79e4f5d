"""Load test of `crackscan serve`: many requests at concurrency 16 against a real server on 127.0.0.1.

The server runs as its own process, started exactly as a user starts it (``python -m crackscan.cli
serve --model M --host 127.0.0.1 --port P``, default settings: 2 workers, 16 waiting). The client sends
a fixed number of requests (default 1,000), bounded in time too, from 16 concurrent connections: most
are ``POST /predict`` with a 227-px patch (the Mendeley patch size), every ``--scan-every``-th is a
``POST /scan`` of a small photo. It reports requests/s, p50/p99 latency per endpoint, errors and status
codes. Goal: 0 errors (no 5xx, no 503, no dropped connection).

Reference, in the same run against the same server: the same mix sent one request at a time
(concurrency 1), so the table shows what concurrency buys and what it costs in latency.

    python benchmarks/load.py                 # 1,000 requests; run it alone (it loads both cores)
    python benchmarks/load.py --quick         # 100 requests, to check that it works
    python benchmarks/load.py --model run/model.safetensors

Without ``--model`` it uses the shipped model; when that is missing it writes a random-weight model
(input 128 px, the training default) to a temporary folder and says so: speed is the same, the answers
mean nothing. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
from datetime import datetime, timezone
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HOST = "127.0.0.1"


@dataclass
class Outcome:
    endpoint: str
    status: int  # 0 = no HTTP answer (connection error, timeout)
    seconds: float
    error: str = ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def pick_model(path: str | None, workdir: Path) -> tuple[Path, str]:
    """The model file to serve and a note on where it came from."""
    from crackscan.model import build_model, default_model_path, make_meta, save_model

    if path:
        return Path(path), "given with --model"
    shipped = default_model_path()
    if shipped.is_file():
        return shipped, "shipped model"
    module = build_model().eval()
    meta = make_meta(classes=["Negative", "Positive"], crack_index=1, input_size=128)
    fallback = save_model(workdir / "random-weights.safetensors", module, meta)
    return fallback, "random weights, input 128 px (the shipped model is missing): timing only"


def payloads(n_patches: int = 32, n_photos: int = 4) -> tuple[list[bytes], list[bytes]]:
    """Generated JPEGs: 227-px patches (half with a drawn crack) and 1008x756 photos."""
    from crackscan.demo import concrete_patch, concrete_photo

    def jpeg(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        return buffer.getvalue()

    rng = np.random.default_rng(0)
    patches = [jpeg(concrete_patch(rng, 227, i % 2 == 0)) for i in range(n_patches)]
    photos = [jpeg(concrete_photo(rng, 1008, 756, crack=i % 2 == 0)) for i in range(n_photos)]
    return patches, photos


def start_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "crackscan.cli", "serve", "--model", str(model), "--host", HOST, "--port", str(port)]
    handle = open(log, "wb")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            return httpx.get(url + "/health", timeout=2).raise_for_status().json()
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s:\n{log.read_text()[-2000:]}")


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM), Linux only."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


async def run_load(url: str, total: int, concurrency: int, scan_every: int, time_limit: float,
                   patches: list[bytes], photos: list[bytes]) -> tuple[list[Outcome], float]:
    """Send ``total`` requests from ``concurrency`` connections; stop issuing new ones after ``time_limit``."""
    counter = iter(range(total))
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.perf_counter() - started > time_limit:
                return
            scan = scan_every > 0 and i % scan_every == scan_every - 1
            endpoint = "/scan" if scan else "/predict"
            field, data = ("photo", photos[i % len(photos)]) if scan else ("file", patches[i % len(patches)])
            t0 = time.perf_counter()
            try:
                response = await client.post(url + endpoint, files={field: (f"img{i}.jpg", data, "image/jpeg")})
                await response.aread()
                error = "" if response.status_code == 200 else response.text[:200]
                outcomes.append(Outcome(endpoint, response.status_code, time.perf_counter() - t0, error))
            except httpx.HTTPError as err:
                outcomes.append(Outcome(endpoint, 0, time.perf_counter() - t0, f"{type(err).__name__}: {err}"))

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return outcomes, time.perf_counter() - started


def summarise(outcomes: list[Outcome], wall: float) -> dict:
    def stats(items: list[Outcome]) -> dict:
        ms = np.array([o.seconds * 1000 for o in items]) if items else np.zeros(0)
        return {
            "requests": len(items),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
            "max_ms": round(float(ms.max()), 1) if len(ms) else None,
        }

    errors = [o for o in outcomes if o.status != 200]
    return {
        "requests": len(outcomes),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(outcomes) / wall, 2) if wall else None,
        **{k: v for k, v in stats(outcomes).items() if k != "requests"},
        "errors": len(errors),
        "status_codes": {str(k): v for k, v in sorted(Counter(o.status for o in outcomes).items())},
        "endpoints": {e: stats([o for o in outcomes if o.endpoint == e]) for e in ("/predict", "/scan")},
        "first_errors": [f"{o.endpoint} {o.status}: {o.error}" for o in errors[:5]],
    }


def print_table(rows: list[tuple[str, dict]]) -> None:
    header = f"{'run':<16}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}  "
    header += "predict p50/p99 ms   scan p50/p99 ms   status codes"
    print(header)
    print("-" * len(header))
    for name, r in rows:
        e = r["endpoints"]
        predict = f"{e['/predict']['p50_ms']}/{e['/predict']['p99_ms']}"
        scan = f"{e['/scan']['p50_ms']}/{e['/scan']['p99_ms']}"
        print(f"{name:<16}{r['requests']:>9}{r['requests_per_s']:>9}{r['p50_ms']:>9}{r['p99_ms']:>9}{r['errors']:>8}  "
              f"{predict:<21}{scan:<18}{r['status_codes']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model file to serve (default: the shipped model, else random weights)")
    parser.add_argument("--requests", type=int, default=1000, help="requests in the concurrent run (default 1000)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent connections (default 16)")
    parser.add_argument("--scan-every", type=int, default=10, help="every N-th request is a /scan (default 10)")
    parser.add_argument("--reference", type=int, default=100, help="requests in the one-at-a-time reference run")
    parser.add_argument("--time-limit", type=float, default=600.0, help="stop issuing requests after this many s")
    parser.add_argument("--quick", action="store_true", help="100 requests, 20 in the reference: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.reference = 100, 20

    with tempfile.TemporaryDirectory(prefix="crackscan-load-") as tmp:
        work = Path(tmp)
        model, origin = pick_model(args.model, work)
        patches, photos = payloads()
        port = free_port()
        url = f"http://{HOST}:{port}"
        log = work / "server.log"
        server = start_server(model, port, log)
        try:
            health = wait_until_up(url, server, log)
            print(f"server {url} (pid {server.pid}), model {model} ({origin}); "
                  f"{health['workers']} workers, capacity {health['capacity']}")
            # Warm-up (not counted): the first scan of a new photo size builds its plan.
            asyncio.run(run_load(url, 4, 2, 2, 60, patches, photos))
            reference_outcomes, reference_wall = asyncio.run(
                run_load(url, args.reference, 1, args.scan_every, args.time_limit, patches, photos))
            load_outcomes, load_wall = asyncio.run(
                run_load(url, args.requests, args.concurrency, args.scan_every, args.time_limit, patches, photos))
            after = httpx.get(url + "/health", timeout=10).json()
            rss = peak_rss_mb(server.pid)
        finally:
            server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    reference = summarise(reference_outcomes, reference_wall)
    load = summarise(load_outcomes, load_wall)
    print()
    print_table([("one at a time", reference), (f"concurrency {args.concurrency}", load)])
    speedup = load["requests_per_s"] / reference["requests_per_s"] if reference["requests_per_s"] else None
    memory = f"; server peak RSS {rss:.0f} MB" if rss else ""
    print(f"\nthroughput x{speedup:.2f} against one at a time; errors {load['errors']} (goal 0){memory}")
    for line in load["first_errors"]:
        print("  error:", line)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("load_quick.json" if args.quick else "load.json")
    document = {
        "benchmark": "load",
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/load.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": str(model), "model_origin": origin,
        "config": {"requests": args.requests, "concurrency": args.concurrency, "scan_every": args.scan_every,
                   "reference_requests": args.reference, "time_limit_s": args.time_limit,
                   "patch": "227x227 JPEG", "photo": "1008x756 JPEG", "server": "defaults (2 workers, 16 waiting)"},
        "reference_one_at_a_time": reference,
        "load": load,
        "throughput_vs_reference": round(speedup, 3) if speedup else None,
        "server_peak_rss_mb": round(rss, 1) if rss else None,
        "server_after": after,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {out.relative_to(ROOT)}")
    return 0 if load["errors"] == 0 and len(load_outcomes) == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
