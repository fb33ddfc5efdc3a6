"""The package, and the engine's CPU kernels (rag/service/engine/*.cpp) built with
torch's cpp_extension where torch and a C++ compiler are at hand (`pip install
--no-build-isolation`, as the Makefile does).  Without them, or if the build fails, the
package installs alone and the engine computes those steps with torch."""

import platform
import warnings

from setuptools import setup


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

    extension = CppExtension(
        "rag.service.engine._kernels",
        ["rag/service/engine/kernels.cpp", "rag/service/engine/layer_ops.cpp"],
        # AVX2 and FMA (x86-64-v3): every CPU these run on has them; kernels.py checks.
        # Without trapping maths the compiler vectorises loops with branches (min, max, NaN).
        extra_compile_args=["-O3", "-march=x86-64-v3", "-fopenmp", "-fno-trapping-math"],
        extra_link_args=["-lgomp"],  # torch's own OpenMP runtime, already loaded
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuild}}


setup(**kernels())
