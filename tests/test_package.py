"""The package's import surface: what ``import crackscan`` gives, and what it costs."""

from __future__ import annotations

import subprocess
import sys

import pytest

import crackscan


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_parsing_the_command_line_does_not_import_torch():
    # `crackscan --help` and argument errors answer at once; torch and torchvision cost ~5 s to import.
    run = _python("import sys, crackscan.cli as cli\n"
                  "cli.build_parser().parse_args(['scan', 'photo.jpg', '--patch-size', '300'])\n"
                  "print(sorted(m for m in ('torch', 'torchvision', 'onnxruntime') if m in sys.modules))")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_help_answers_without_a_model(tmp_path):
    run = subprocess.run([sys.executable, "-m", "crackscan.cli", "scan", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0 and "--patch-size" in run.stdout, run.stderr


def test_public_names_load_on_first_use():
    run = _python("import sys, crackscan\n"
                  "before = 'crackscan.model' in sys.modules\n"
                  "from crackscan import load_model, CrackModel\n"
                  "import crackscan.model as m\n"
                  "print(before, load_model is m.load_model, CrackModel is m.CrackModel)")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "True", "True"]


def test_every_public_name_resolves_and_unknown_names_fail():
    assert set(crackscan._EXPORTS) == set(crackscan.__all__) - {"__version__"}  # one list of names
    for name in crackscan.__all__:
        assert getattr(crackscan, name) is not None
        assert name in dir(crackscan)
    with pytest.raises(AttributeError, match="no_such_thing"):
        crackscan.no_such_thing  # noqa: B018


def test_choosing_the_backend_looks_for_onnx_without_importing_it():
    # onnx is needed only to export a graph the first time; importing it costs every command ~0.25 s.
    run = _python("import sys\n"
                  "from crackscan.model import resolve_backend\n"
                  "chosen, imported = resolve_backend('auto'), 'onnx' in sys.modules\n"
                  "sys.modules['onnx'] = None  # as if it were not installed\n"
                  "print(chosen, imported, resolve_backend('auto'), resolve_backend('onnx'))")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["onnx", "False", "torch", "onnx"]
