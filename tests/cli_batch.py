"""Run several ``crackscan`` command lines in one process, each with its own stdout, stderr and exit code.

Starting Python with torch and torchvision costs seconds, so the hostile-input tests run all their
command lines through :func:`crackscan.cli.main` in one child process instead of one process each.
Output is captured at the file-descriptor level, so anything the command, a library or a C extension
writes is kept; an exception escaping ``main`` is written out as the traceback a user would see.

Usage: ``python tests/cli_batch.py JOBS.json RESULTS.json`` where JOBS.json is ``{name: [args...]}``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback


def run_one(args: list[str]) -> dict:
    from crackscan.cli import main

    sys.stdout.flush()
    sys.stderr.flush()
    started = time.perf_counter()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            code = main(args)
        except SystemExit as stop:  # argparse errors
            code = stop.code if isinstance(stop.code, int) else 2
        except BaseException:
            traceback.print_exc()
            code = "crashed"
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        texts = []
        for handle in (out, err):
            handle.seek(0)
            # surrogateescape keeps non-UTF-8 file names as Python spells them in paths
            texts.append(handle.read().decode("utf-8", errors="surrogateescape"))
    return {"code": code, "out": texts[0], "err": texts[1], "seconds": round(time.perf_counter() - started, 2)}


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as handle:
        jobs = json.load(handle)
    results = {name: run_one(args) for name, args in jobs.items()}
    with open(sys.argv[2], "w", encoding="utf-8") as handle:
        json.dump(results, handle)
