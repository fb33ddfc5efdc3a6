"""The package, and the engine's CPU kernels (rag/service/engine/*.cpp) built with
torch's cpp_extension where torch and a C++ compiler are at hand (`pip install
--no-build-isolation`, as the Makefile does).  Without them, or if the build fails, the
package installs alone and the engine computes those steps with torch."""

import platform
import warnings

from setuptools import setup

LIBRARY = "rag.service.engine._kernels"


def kernels() -> dict:
    if platform.machine() not in ("x86_64", "AMD64"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return {}

    class OptionalBuild(BuildExtension):
        """torch's build, where any failure (no compiler, an old one, a compile error:
        torch checks the compiler before building) leaves the package without kernels."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:
                warnings.warn(f"kernels not built ({exc}); the engine uses torch", stacklevel=1)

    sources = ["rag/service/engine/kernels.cpp", "rag/service/engine/layer_ops.cpp"]
    # Without trapping maths the compiler vectorises loops with branches (min, max, NaN).
    flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    link = ["-lgomp"]  # torch's own OpenMP runtime, already loaded
    extensions = [
        # AVX2 and FMA (x86-64-v3): every CPU these run on has them; kernels.py checks.
        CppExtension(LIBRARY, sources, extra_compile_args=[*flags, "-march=x86-64-v3"],
                     extra_link_args=link),
        # The same for CPUs with AVX-512 (x86-64-v4), twice the vector width, which
        # kernels.py loads where torch runs its own AVX-512 code.
        # It alone holds the 4-bit matmul for AVX512-BF16 (int4_matmul.cpp).
        CppExtension(f"{LIBRARY}_avx512",
                     [*(p.replace(".cpp", "_avx512.cpp") for p in sources),
                      "rag/service/engine/int4_matmul.cpp"],
                     extra_compile_args=[*flags, "-march=x86-64-v4"], extra_link_args=link),
    ]  # fmt: skip
    return {"ext_modules": extensions, "cmdclass": {"build_ext": OptionalBuild}}


setup(**kernels())
