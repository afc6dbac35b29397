"""Build script. Plain `pip install .` builds nothing native and needs neither a compiler nor torch:
the fused C++ CPU op in csrc/ compiles just in time on first use (see pgdpo/loss/cpu_op.py).

To prebuild that op as the extension ``pgdpo._C`` (as DeepSpeed's DS_BUILD_* op builders do), set
PGDPO_BUILD_CPU_OP=1 and build against the torch you will run with:

    PGDPO_BUILD_CPU_OP=1 pip install --no-build-isolation .

The extension targets the instruction set torch reports for the build machine; for a wheel meant for
other machines, lower it with e.g. ATEN_CPU_CAPABILITY=avx2. At run time a prebuilt op for another
torch version or for an instruction set the CPU lacks is skipped in favour of the just-in-time build.
"""

import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_op_extension():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        raise SystemExit(
            "PGDPO_BUILD_CPU_OP=1 compiles the C++ op against the installed torch, so torch must be "
            "importable at build time: install torch first, then run `PGDPO_BUILD_CPU_OP=1 pip install "
            "--no-build-isolation .` (build isolation hides the installed torch)") from exc
    # pgdpo/loss/cpu_op.py holds the one list of sources and flags; load it standalone, since importing the
    # pgdpo package would import its runtime dependencies.
    path = os.path.join(HERE, "pgdpo", "loss", "cpu_op.py")
    spec = importlib.util.spec_from_file_location("_pgdpo_cpu_op_build", path)
    cpu_op = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_op)
    cap = cpu_op.capability()
    ext = CppExtension(
        "pgdpo._C",
        sources=[os.path.join("csrc", name) for name in cpu_op.COMPILED_SOURCES],
        extra_compile_args=cpu_op.compile_flags(cap),
        extra_link_args=cpu_op.LINK_FLAGS,
    )
    return [ext], {"build_ext": BuildExtension}


if os.environ.get("PGDPO_BUILD_CPU_OP", "0") == "1":
    ext_modules, cmdclass = cpu_op_extension()
else:
    ext_modules, cmdclass = [], {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
