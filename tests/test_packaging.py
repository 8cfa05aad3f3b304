"""gru_fused ships: the sdist holds every file the build needs, pip builds it and the result
imports; the extension carries no debug information; `import gru_fused` needs neither
package of the `train` extra; run records say what ran, on which text, how loaded.

The sdist install test builds the CPU kernels from the sdist (about a minute on 2 cores).
GRU_FUSED_SKIP_SDIST_INSTALL=1 skips it for quick local runs; CI (CI set) always runs it.
"""
import ast
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

import gru_fused
from gru_fused import data, train

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _setup_sources():
    """CPU_SOURCES + CUDA_SOURCES, read from setup.py without running it."""
    sources = {}
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            name = getattr(node.targets[0], "id", None)
            if name in ("CPU_SOURCES", "CUDA_SOURCES"):
                sources[name] = ast.literal_eval(node.value)
    assert set(sources) == {"CPU_SOURCES", "CUDA_SOURCES"}, "setup.py lists its sources"
    return sources["CPU_SOURCES"] + sources["CUDA_SOURCES"]


def _local_includes(path: Path):
    """The files that path's `#include "..."` lines name (whatever the #if around them),
    resolved as the compiler does: beside the file, then in csrc/ (the build's -I)."""
    found = []
    for name in re.findall(r'^\s*#\s*include\s*"([^"]+)"', path.read_text(), re.MULTILINE):
        for base in (path.parent, ROOT / "csrc"):
            if (base / name).is_file():
                found.append((base / name).resolve())
                break
        else:
            raise AssertionError(f"{path}: #include \"{name}\" not found")
    return found


def _git_commit():
    """setup.py's git_commit(): HEAD's short hash, "-dirty" with modified tracked files."""
    def git(*args):
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT,
                              capture_output=True, text=True)
    try:
        top = git("rev-parse", "--show-toplevel")
    except OSError:
        return None
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
        return None
    head = git("rev-parse", "--short", "HEAD").stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head + ("-dirty" if dirty else "")


def elf_section_names(path) -> list:
    """Section names of an ELF file (no binutils needed)."""
    blob = Path(path).read_bytes()
    assert blob[:4] == b"\x7fELF", f"{path} is not an ELF file"
    is64, order = blob[4] == 2, "<" if blob[5] == 1 else ">"
    if is64:
        shoff = struct.unpack_from(order + "Q", blob, 0x28)[0]
        shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", blob, 0x3A)
        header = order + "IIQQQQ"
    else:
        shoff = struct.unpack_from(order + "I", blob, 0x20)[0]
        shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", blob, 0x2E)
        header = order + "IIIIII"

    def section(i):  # (name offset, file offset, size)
        name, _, _, _, offset, size = struct.unpack_from(header, blob, shoff + i * shentsize)
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    names = []
    for i in range(shnum):
        start = strtab + section(i)[0]
        names.append(blob[start:blob.index(b"\0", start)].decode())
    return names


# --- The sdist ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """`python -m build --sdist --no-isolation` of the checkout (no isolation: the build
    would otherwise install another torch to read setup.py)."""
    out = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation",
                           "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [tarball] = out.glob("gru_fused-*.tar.gz")
    return tarball


def _members(tarball: Path):
    """Member files of the sdist, relative to its top directory."""
    with tarfile.open(tarball) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = names[0].split("/")[0]
    assert all(n.startswith(top + "/") for n in names)
    return {n[len(top) + 1:] for n in names}


def test_sdist_holds_everything_the_build_reads(sdist):
    members = _members(sdist)
    assert sdist.name == f"gru_fused-{_pyproject()['project']['version']}.tar.gz"
    # Every file under csrc/, recursively (headers, the emulation layer's included).
    csrc = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.parts)}
    assert csrc and not csrc - members, f"missing from the sdist: {sorted(csrc - members)}"
    # What setup.py reads besides, the package (its modules, py.typed, _version.py), and
    # the license.
    package = {f"gru_fused/{p.name}" for p in (ROOT / "gru_fused").glob("*.py")}
    needed = {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE",
              "gru_fused/py.typed", "gru_fused/_version.py"} | package
    assert not needed - members, f"missing from the sdist: {sorted(needed - members)}"
    # The tests come along (the emulation tests' sources in tests/emu too); build outputs do not.
    assert {"tests/conftest.py", "tests/emu/emu_ops.cpp", "tests/emu/sanitize_main.cpp"} <= members
    assert not [m for m in members if m.endswith((".so", ".o", ".pyc"))]


def test_build_reads_only_csrc():
    """The include closure of setup.py's sources stays inside csrc/: the build needs
    nothing from tests/ (tests/emu's sources are the tests' own)."""
    sources = [ROOT / s for s in _setup_sources()]
    assert {s.relative_to(ROOT).as_posix() for s in sources} == {
        p.relative_to(ROOT).as_posix()
        for p in list((ROOT / "csrc").rglob("*.cpp")) + list((ROOT / "csrc").rglob("*.cu"))}
    seen, todo = set(), [s.resolve() for s in sources]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_local_includes(path))
    outside = [p for p in seen if (ROOT / "csrc") not in p.parents]
    assert not outside, outside


@pytest.mark.skipif(bool(os.environ.get("GRU_FUSED_SKIP_SDIST_INSTALL"))
                    and not os.environ.get("CI"),
                    reason="GRU_FUSED_SKIP_SDIST_INSTALL is set (CI runs this test)")
def test_pip_install_of_the_sdist_builds_and_imports(sdist, tmp_path):
    target = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(GRU_FUSED_FORCE_CPU="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation",
                           "--no-deps", "--no-index", "--no-cache-dir",
                           "--disable-pip-version-check", "--target", str(target), str(sdist)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    package = target / "gru_fused"
    assert (package / "py.typed").is_file()
    assert list(target.glob("gru_fused-*.dist-info/licenses/LICENSE"))
    [extension] = package.glob("_C*.so") if sys.platform != "win32" else package.glob("_C*.pyd")
    if sys.platform.startswith("linux"):
        assert not [s for s in elf_section_names(extension) if s.startswith(".debug")]

    with tarfile.open(sdist) as tar:
        [version_file] = [m for m in tar.getmembers() if m.name.endswith("gru_fused/_version.py")]
        recorded = tar.extractfile(version_file).read().decode()
    check = textwrap.dedent("""
        import json, sys
        # An editable install of some checkout must not shadow the installed copy.
        sys.meta_path[:] = [f for f in sys.meta_path
                            if not getattr(f, "__module__", "").startswith("__editable__")]
        import torch
        import gru_fused
        torch.manual_seed(0)
        ref = torch.nn.GRU(4, 3)
        x, h0 = torch.randn(5, 2, 4), torch.randn(2, 3)
        out, h_n = gru_fused.gru(x, h0, ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0,
                                 ref.bias_hh_l0)
        want, want_h = ref(x, h0[None])
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(h_n, want_h[0])
        print(json.dumps({"file": gru_fused.__file__, "version": gru_fused.__version__,
                          "commit": gru_fused.__commit__, "cuda": gru_fused.cuda_compiled()}))
    """)
    run_env = dict(env, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=run_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(info["file"]).resolve().is_relative_to(target.resolve())
    assert info["version"] == _pyproject()["project"]["version"] == gru_fused.__version__
    assert info["cuda"] is False  # GRU_FUSED_FORCE_CPU
    # The sdist carries the commit it was made from, and the build from it keeps it.
    assert f"__commit__ = {info['commit']!r}" in recorded
    commit = _git_commit()
    if commit is not None:
        assert info["commit"].split("-")[0] == commit.split("-")[0]
    else:
        assert info["commit"]


# --- The release extension ----------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF sections")
@pytest.mark.skipif(bool(os.environ.get("GRU_FUSED_DEBUG_INFO")),
                    reason="GRU_FUSED_DEBUG_INFO asks for a build with debug information")
def test_extension_has_no_debug_info():
    """setup.py builds without -g (Python's CFLAGS have it) and strips at link: an
    extension built before that is several times larger. Rebuild if this fails."""
    sections = elf_section_names(gru_fused._C.__file__)
    assert ".text" in sections
    assert not [s for s in sections if s.startswith(".debug")], gru_fused._C.__file__


def test_version_and_commit():
    assert gru_fused.__version__ == _pyproject()["project"]["version"]
    assert isinstance(gru_fused.__commit__, str) and gru_fused.__commit__
    commit = _git_commit()
    version_file = ROOT / "gru_fused" / "_version.py"
    if commit is not None and version_file.is_file() and \
            Path(gru_fused.__file__).resolve().parent == version_file.parent:
        # Built from this checkout: the commit built is HEAD (or was when it was built).
        assert re.fullmatch(r"[0-9a-f]{4,40}(-dirty)?", gru_fused.__commit__)


# --- Extras -------------------------------------------------------------------------

def test_import_needs_no_train_extra():
    """`import gru_fused` (and gru_fused.train itself) with tqdm and matplotlib missing;
    training or plotting then says which extra to install."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        BLOCKED = ("tqdm", "matplotlib")

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
                return None

        sys.meta_path.insert(0, Blocker())
        import torch
        import gru_fused
        from gru_fused import data, reference, scratch, train
        assert gru_fused.__file__.startswith({str(ROOT)!r}), gru_fused.__file__
        x = torch.randn(3, 2, 4)
        out, h_n = gru_fused.FusedGRU(4, 5)(x)
        assert out.shape == (3, 2, 5)
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        for call in (lambda: train.plot_perplexity({{"a": [2.0, 1.0]}}, "x.png", "t"),
                     lambda: train.train(None, [], None, 1.0, 1, "cpu", progress=False)):
            try:
                call()
            except ImportError as e:
                print("ImportError:", e)
            else:
                raise SystemExit("no ImportError")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    messages = [line for line in proc.stdout.splitlines() if line.startswith("ImportError:")]
    assert len(messages) == 2
    assert "matplotlib" in messages[0] and "tqdm" in messages[1]
    for message in messages:
        assert 'pip install "gru_fused[train]"' in message


def test_extras_cover_the_tools():
    project = _pyproject()["project"]
    assert not {"tqdm", "matplotlib"} & set(project["dependencies"])
    extras = project["optional-dependencies"]
    assert set(extras["train"]) == {"tqdm", "matplotlib"}
    assert set(extras["onnx"]) == {"onnx", "onnxscript", "onnxruntime"}
    assert set(extras["train"]) | set(extras["onnx"]) | {
        "pytest", "hypothesis", "ninja", "pybind11", "build"} <= set(extras["test"])
    assert project["license"] == "BSD-3-Clause" and project["license-files"] == ["LICENSE"]
    assert "BSD 3-Clause" in (ROOT / "LICENSE").read_text()


def test_readme_commands_install_the_extras():
    readme = (ROOT / "README.md").read_text()
    ci = readme.split("<!-- ci:test -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert 'pip install --no-build-isolation -e ".[test]"' in ci and "pytest" in ci
    assert 'pip install --no-build-isolation -e ".[train]" && python benchmarks/bench.py' in readme


# --- Run records ----------------------------------------------------------------------

def _check_record_fields(record, text_path):
    assert record["gru_fused"] == {"version": gru_fused.__version__,
                                   "commit": gru_fused.__commit__}
    assert record["data"] == {"path": str(Path(text_path).resolve()), "sha1": data.SHA1}
    for when in ("start", "end"):
        load = record["loadavg"][when]
        assert len(load) == 3 and all(x >= 0 for x in load)


def test_train_record_fields(tmp_path, text_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(["--impl", "fused", "--epochs", "1", "--hidden", "8", "--data",
                    str(text_path), "--out", str(tmp_path), "--no-progress",
                    "--sample-every", "0"])
    finally:
        torch.set_num_threads(threads)
    [path] = tmp_path.glob("train-fused-*.json")
    _check_record_fields(json.loads(path.read_text()), text_path)


def test_bench_record_fields(tmp_path, text_path):
    spec = importlib.util.spec_from_file_location("gru_fused_bench_fields",
                                                  ROOT / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--smoke", "--part", "train", "--impls", "fused", "--device", "cpu",
                    "--threads", "1", "--no-progress", "--data", str(text_path),
                    "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    [path] = tmp_path.glob("bench-*.json")
    _check_record_fields(json.loads(path.read_text()), text_path)
