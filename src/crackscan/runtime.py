"""Process settings that make PyTorch fast on an ordinary CPU.

glibc's default allocator returns large freed blocks to the operating system with ``munmap`` and asks
for them again on the next batch; for a CNN's activation buffers that costs more than the arithmetic
(measured in ``benchmarks/throughput.py``: several times slower forward passes). crackscan therefore
tells glibc to keep its memory for its own process. ``CRACKSCAN_NO_MALLOC_TUNING=1`` or the CLI flag
``--no-malloc-tuning`` turns this off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import multiprocessing
import os
import platform
import signal
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Sequence, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_tuned = False


def tune_allocator() -> bool:
    """Keep freed memory in the process instead of returning it each batch (glibc only; idempotent).

    Returns:
        True when the settings were applied (or already were), False where they cannot be.
    """
    global _tuned
    if _tuned:
        return True
    if os.environ.get("CRACKSCAN_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    ok &= mallopt(_M_TOP_PAD, 256 << 20) == 1
    _tuned = bool(ok)
    return _tuned


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` knows).

    PyTorch and ONNX Runtime choose their kernels by the processor's instruction sets, so the same training
    on another processor differs in the last bits of its sums, and training amplifies that: model files and
    benchmark results record it beside the package versions.
    """
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def shared_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array in memory that processes forked after this call share with this one.

    What a :func:`parallel_map` worker process writes into it, the caller sees (an anonymous shared
    mapping), so large results need not be pickled back through a pipe. Threads share it as any array.
    The sharing lasts: a process forked later can write into it too (there is no copy-on-write), so
    make it read-only once it is filled.
    """
    count = int(np.prod(shape))
    buffer = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(buffer, dtype, count=count).reshape(shape)


def parallel_map(fn: Callable[[T], R], items: Sequence[T], *, processes: bool | None = None,
                 min_for_processes: int = 512, chunksize: int = 128,
                 progress: Callable[[int], object] | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on every usable core, in order.

    Decoding and drawing small images is half Python (PIL's header parsing, EXIF, glue code) and half C
    that releases the GIL, so threads barely beat one core: decoding the 227-px dev patches ran at 1,677
    images/s serially, 1,736 on 2 threads and 2,655 in 2 forked processes. Long lists therefore go to
    forked worker processes (Linux: they inherit the imported modules instead of importing torch again);
    short ones, other platforms, or a pool that cannot start use threads. Results are the same either way.

    Args:
        fn: A module-level function (or a ``functools.partial`` of one), so that processes can receive it.
        items: Its arguments; they and the results travel between processes.
        processes: Force processes (True) or threads (False); None decides as above.
        min_for_processes: Shortest list worth starting processes for.
        chunksize: Items sent to a worker process at a time.
        progress: Called with the number of items just finished.
    """
    workers = max(2, cpu_count())
    progress = progress or (lambda done: None)
    if processes is None:
        processes = len(items) >= min_for_processes and cpu_count() > 1 and sys.platform.startswith("linux")
    results: list[R] = []
    if processes and "fork" not in multiprocessing.get_all_start_methods():
        processes = False
    if processes:
        try:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker) as pool:
                for result in pool.map(fn, items, chunksize=chunksize):
                    results.append(result)
                    progress(1)
            return results
        except (OSError, BrokenProcessPool) as err:  # no semaphores or processes allowed, a killed worker
            warnings.warn(f"running on threads instead of processes ({type(err).__name__}: {err})")
            progress(-len(results))
            results = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(fn, items):
            results.append(result)
            progress(1)
    return results


def _start_worker() -> None:
    # Ctrl-C reaches the whole process group; the parent stops the pool, the workers need not print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One thread per worker, as PyTorch's DataLoader does: the workers already fill the cores, and an
    # OpenMP team entered in a child forked from a parent that used one (GNU libgomp) can hang for ever.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
