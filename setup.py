"""The optional C part of featurepipe (metadata lives in pyproject.toml).

``featurepipe.core._native`` builds Redis ``RESTORE`` commands for materialisation. If
it cannot be compiled (no C compiler), installation goes on and featurepipe uses the
slower NumPy path in ``featurepipe.online.dump`` instead.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure: fall back, say so
            self.warn(f"featurepipe: C extension not built ({exc}); using the NumPy fallback")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self.warn(f"featurepipe: {ext.name} not built ({exc}); using the NumPy fallback")


setup(
    ext_modules=[Extension("featurepipe.core._native", ["featurepipe/core/_native.c"],
                           extra_compile_args=["-O2"])],
    cmdclass={"build_ext": OptionalBuildExt},
)
