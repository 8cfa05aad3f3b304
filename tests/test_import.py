"""Importing gru_fused from a source tree whose compiled extension is missing or broken
gives an ImportError that says so and how to fix it, not Python's "cannot import name
'_C' from partially initialized module ... (most likely due to a circular import)"."""
import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The checkout may be an editable install, whose import hook would find the checkout's
# _C for the copy below; a non-editable install has no such hook, so drop it.
IMPORT = ("import sys\n"
          "sys.meta_path[:] = [f for f in sys.meta_path\n"
          "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n"
          "import gru_fused\n")


def _import_copy(tmp_path, extension_bytes=None):
    """Runs `import gru_fused` in tmp_path, which holds a copy of the package's .py files
    (and, if given, a file named like the extension with extension_bytes in it)."""
    pkg = tmp_path / "gru_fused"
    pkg.mkdir()
    for source in (ROOT / "gru_fused").glob("*.py"):
        shutil.copy(source, pkg)
    if extension_bytes is not None:
        (pkg / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(extension_bytes)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", IMPORT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, "gru_fused imported without its extension"
    # The last line of the traceback is the exception the user reads.
    return pkg, proc.stderr.strip().splitlines()[-1]


def test_missing_extension_says_so_and_how_to_build_it(tmp_path):
    pkg, message = _import_copy(tmp_path)
    assert message.startswith("ImportError: ")
    assert f"gru_fused._C was not found in {pkg}" in message
    assert "pip install --no-build-isolation -e ." in message
    assert "outside the checkout" in message
    assert "circular import" not in message


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a broken ELF file")
def test_broken_extension_says_it_could_not_be_loaded(tmp_path):
    pkg, message = _import_copy(tmp_path, b"not a shared library")
    assert message.startswith("ImportError: ")
    assert f"gru_fused._C could not be loaded from {pkg}" in message
    assert "pip install" in message and "circular import" not in message
