"""The fused C++ CPU op of ``csrc/``: find or build it, load it, call it.

Loading the library registers the CPU kernels of the op ``pgdpo::fused_loss`` / ``fused_loss_backward``
that :mod:`pgdpo.loss.op` defines (``TORCH_LIBRARY_IMPL(pgdpo, CPU, ...)`` in ``csrc/pgdpo_cpu_ops.cpp``).

Where the compiled op comes from, first match wins:

1. ``pgdpo._C``, prebuilt by ``PGDPO_BUILD_CPU_OP=1 pip install --no-build-isolation .`` (see
   ``setup.py``). Used only when it was built for this torch version and an instruction set this CPU
   runs; otherwise it is skipped (never loaded) and the op is built just in time instead.
2. A just-in-time build with ``torch.utils.cpp_extension.load``, cached per user in
   ``$PGDPO_CACHE_DIR`` (default ``$XDG_CACHE_HOME/pgdpo`` or ``~/.cache/pgdpo``) under a key hashing
   the sources, the compiler flags, torch's version and the instruction set. A cached build is loaded
   directly: no compiler is needed after the first build.

Instruction set: the build targets the ``at::vec`` capability torch reports for this machine
(``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2 or DEFAULT; ``ATEN_CPU_CAPABILITY=avx2``
lowers it) with the ``-m`` flags ATen uses for its own kernels of that level, never ``-march=native``.
The capability is part of the cache key and of the prebuilt library's marker, so a cache directory or
wheel moved to an older CPU is rebuilt or skipped rather than run into an illegal instruction.

This module imports nothing from ``pgdpo`` so that ``setup.py`` can load it standalone for the flags.
Call :func:`unavailable_reason` (what backend resolution does) before running the op on CPU tensors.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
import platform
import shlex
import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

#: Files of ``csrc/`` that make up the op; the ``.cpp`` ones are compiled.
SOURCES = ("pgdpo_cpu.h", "pgdpo_cpu_kernels.cpp", "pgdpo_cpu_ops.cpp")
COMPILED_SOURCES = tuple(s for s in SOURCES if s.endswith(".cpp"))

# ATen's own flags for its kernels of each capability (cmake/Codegen.cmake: "-mavx2 -mfma" and
# "-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma") plus F16C, which every such CPU has and at::vec's
# fp16 conversions use, and the CPU_CAPABILITY defines that select at::vec's implementation.
ISA_FLAGS = {
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}
_ISA_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
#: Linked against the OpenMP runtime torch already loaded (same soname), so at::parallel_for in the
#: op shares torch's thread pool and follows torch.set_num_threads.
LINK_FLAGS = ["-fopenmp"]

_NAME = "pgdpo_cpu_op"
_MARKER = b"PGDPO_CPU_OP_BUILD "
_OK_FILE = "BUILD_OK"

_lock = threading.Lock()
_state: tuple[str | None, str | None] | None = None  # (library path, reason it is unavailable)


def capability() -> str:
    """The at::vec instruction set to build for on this machine: "AVX512", "AVX2" or "DEFAULT"."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in ISA_FLAGS else "DEFAULT"


def compile_flags(cap: str) -> list[str]:
    """Compiler flags of the op for instruction set ``cap`` (a key of ``ISA_FLAGS``)."""
    return ["-O3", "-fopenmp", f"-DPGDPO_CAPABILITY={cap}", *ISA_FLAGS[cap]]


def cache_root() -> Path:
    """Root of the just-in-time build cache."""
    if os.environ.get("PGDPO_CACHE_DIR"):
        return Path(os.environ["PGDPO_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pgdpo"


def unavailable_reason() -> str | None:
    """Why the fused CPU op cannot be used, or None when it can (finds, builds or loads it on first call).

    The outcome is cached for the life of the process, failures included.
    """
    return _ensure()[1]


def library_path() -> str | None:
    """Path of the loaded shared library (prebuilt or from the cache), or None when unavailable."""
    return _ensure()[0]


def build_info() -> str:
    """The loaded library's build marker (``"PGDPO_CPU_OP_BUILD capability=... torch=... chunk=...;"``)."""
    _require()
    return torch.ops.pgdpo_cpu.build_info()


def _require() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"pgdpo: the fused CPU op is not available: {reason}")


def _ensure() -> tuple[str | None, str | None]:
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _find_or_build()
    return _state


def _find_or_build() -> tuple[str | None, str | None]:
    notes = []
    path, note = _load_prebuilt()
    if path is not None:
        return path, None
    if note:
        notes.append(note)
    path, reason = _load_jit()
    if reason is not None and notes:
        reason = f"{reason} ({'; '.join(notes)})"
    return path, reason


def read_marker(path: str | os.PathLike) -> dict[str, str] | None:
    """The build marker of a compiled op library, read from its bytes without loading it."""
    data = Path(path).read_bytes()
    at = data.find(_MARKER)
    if at < 0:
        return None
    end = data.find(b";", at)
    fields = data[at + len(_MARKER):end].decode("ascii", "replace").split()
    return dict(f.split("=", 1) for f in fields if "=" in f)


def _load_prebuilt() -> tuple[str | None, str | None]:
    try:
        spec = importlib.util.find_spec("pgdpo._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None, None
    return _try_prebuilt(spec.origin)


def _try_prebuilt(origin: str) -> tuple[str | None, str | None]:
    # Decide from the marker before loading: loading runs the static op registration, which cannot be
    # undone, and a library for another torch or a newer CPU must never run.
    marker = read_marker(origin) or {}
    built_cap, built_torch = marker.get("capability"), marker.get("torch")
    here_torch = torch.__version__.split("+")[0]
    if built_torch != here_torch:
        return None, f"prebuilt {origin} is for torch {built_torch}, this is torch {here_torch}"
    if _ISA_RANK.get(built_cap, 99) > _ISA_RANK.get(capability(), 0):
        return None, f"prebuilt {origin} needs {built_cap}, this CPU runs {capability()}"
    try:
        torch.ops.load_library(origin)
    except OSError as exc:
        return None, f"prebuilt {origin} could not be loaded: {exc}"
    return origin, None


def _cache_key(cap: str, sources: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name] + b"\0")
    for part in (torch.__version__, str(torch.version.git_version), cap, " ".join(compile_flags(cap)),
                 " ".join(LINK_FLAGS), platform.machine(), f"{sys.version_info[0]}.{sys.version_info[1]}"):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _find_compiler() -> tuple[str | None, str | None]:
    """The C++ compiler torch.utils.cpp_extension will run, or the reason there is none."""
    cxx = os.environ.get("CXX")
    if cxx is not None and cxx.strip():
        prog = shlex.split(cxx)[0]
        if shutil.which(prog):
            return cxx, None
        return None, (f"no C++ compiler found: $CXX is set to {cxx!r}, which is not an executable; point CXX "
                      f"at a C++ compiler (or unset it to use c++ / g++), or use backend='torch'")
    for candidate in ("c++", "g++", "clang++"):
        if shutil.which(candidate):
            return candidate, None
    return None, ("no C++ compiler found (looked for $CXX, c++, g++, clang++): install g++ "
                  "(e.g. `apt-get install g++`) or use backend='torch'")


def _sources() -> dict[str, bytes]:
    src_dir = importlib.resources.files("pgdpo.csrc")
    return {name: src_dir.joinpath(name).read_bytes() for name in SOURCES}


def build_directory(cap: str | None = None) -> Path:
    """The JIT cache entry of the op for the instruction set ``cap`` (default: this process's) and the
    installed sources."""
    cap = cap or capability()
    return cache_root() / "cpu_op" / f"{cap.lower()}-{_cache_key(cap, _sources())}"


@contextmanager
def _one_builder(build_dir: Path):
    """Hold an OS file lock on ``build_dir`` while building: one process builds, the others wait and then
    load its result. ``torch.utils.cpp_extension`` has a lock of its own (the file ``lock``), but it is a
    plain file that a killed build leaves behind, and every later process then waits for it forever; an
    ``flock`` is released by the kernel when its holder dies. Holding ours, a ``lock`` file can only be such
    a leftover (every pgdpo build takes ours first), so it is removed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock alone
        yield
        return
    with open(build_dir / ".build.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            leftover = build_dir / "lock"
            if leftover.exists():
                print(f"pgdpo: removing {leftover}, left by a build of the CPU op that did not finish",
                      file=sys.stderr, flush=True)
                leftover.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_cached(build_dir: Path) -> str | None:
    lib = build_dir / f"{_NAME}.so"
    if (build_dir / _OK_FILE).is_file() and lib.is_file():
        try:
            torch.ops.load_library(str(lib))
            return str(lib)
        except OSError:
            pass  # a damaged cache entry: rebuild it
    return None


def _load_jit() -> tuple[str | None, str | None]:
    cap = capability()
    try:
        sources = _sources()
    except OSError as exc:
        return None, f"the op's C++ sources are missing from the installed package ({exc}); reinstall pgdpo"
    build_dir = cache_root() / "cpu_op" / f"{cap.lower()}-{_cache_key(cap, sources)}"
    if (cached := _load_cached(build_dir)) is not None:
        return cached, None

    compiler, reason = _find_compiler()
    if reason is not None:
        return None, reason
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return None, ("the 'ninja' build tool is missing (torch.utils.cpp_extension needs it to compile the "
                      "op): `pip install ninja`, or use backend='torch'")
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return None, (f"cannot write the build cache {build_dir} ({exc}): set PGDPO_CACHE_DIR to a writable "
                      f"directory, or use backend='torch'")
    with _one_builder(build_dir):
        if (cached := _load_cached(build_dir)) is not None:  # another process built it while we waited
            return cached, None
        return _build(build_dir, cap, sources, compiler, cpp_extension)


def _build(build_dir: Path, cap: str, sources: dict[str, bytes], compiler: str, cpp_extension):
    lib = build_dir / f"{_NAME}.so"
    # Compile private copies: the package may live in a zip or a read-only tree, and the copies keep
    # the cache entry self-describing.
    src_copy = build_dir / "src"
    try:
        src_copy.mkdir(parents=True, exist_ok=True)
        for name, data in sources.items():
            dst = src_copy / name
            if not dst.is_file() or dst.read_bytes() != data:
                dst.write_bytes(data)
    except OSError as exc:
        return None, (f"cannot write the build cache {build_dir} ({exc}): set PGDPO_CACHE_DIR to a writable "
                      f"directory, or use backend='torch'")
    print(f"pgdpo: compiling the fused CPU op (first use, ~1 min; cached in {build_dir})...", file=sys.stderr,
          flush=True)
    saved_cxx = os.environ.get("CXX")
    os.environ["CXX"] = compiler  # cpp_extension runs $CXX, defaulting to c++ even when only g++ exists
    try:
        cpp_extension.load(
            name=_NAME, sources=[str(src_copy / s) for s in COMPILED_SOURCES],
            extra_cflags=compile_flags(cap), extra_ldflags=LINK_FLAGS, build_directory=str(build_dir),
            is_python_module=False, verbose=False)
    except Exception as exc:  # compiler errors arrive as RuntimeError with the build log; keep its end
        parts = (exc, getattr(exc, "output", None), getattr(exc, "stderr", None))  # CalledProcessError
        log = "\n".join(str(x) for x in parts if x)
        tail = "\n".join(log.strip().splitlines()[-20:])
        return None, (f"building the fused CPU op failed (build directory {build_dir}); "
                      f"the build log ends:\n{tail}")
    finally:
        if saved_cxx is None:
            os.environ.pop("CXX", None)
        else:
            os.environ["CXX"] = saved_cxx
    try:  # marks the entry complete for later processes, which then load it without a compiler
        (build_dir / _OK_FILE).write_text(f"{cap} torch {torch.__version__}\n")
    except OSError:
        pass  # this process has the op loaded; later ones will just run ninja once more
    return str(lib), None
