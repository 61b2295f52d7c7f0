"""Builds aft_fast._C by running CMake (CMakeLists.txt is the one build description).

Build without isolation so that the installed torch is the one compiled against:
    pip install -e . --no-build-isolation
Environment: CMAKE_BUILD_TYPE (Release), MAX_JOBS (all cores). The CPU code paths are chosen at run
time (CMakeLists.txt), so a build runs on any CPU of its architecture.
Metadata lives in pyproject.toml.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_INSTALL_PREFIX={out_dir}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if shutil.which("ccache"):
            args.append("-DCMAKE_CXX_COMPILER_LAUNCHER=ccache")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", config, "-j", jobs], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--install", ".", "--config", config], cwd=build_dir, check=True)


setup(
    # Every package under aft_fast/, found rather than listed (tests/test_packaging.py); the Triton kernels
    # live in kernels/ and install as aft_fast.kernels, a mapping that pyproject's packages.find cannot make.
    packages=[*find_packages(include=["aft_fast", "aft_fast.*"]), "aft_fast.kernels"],
    package_dir={"aft_fast": "aft_fast", "aft_fast.kernels": "kernels"},
    ext_modules=[CMakeExtension("aft_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
