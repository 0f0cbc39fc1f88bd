"""Installs directclr and builds its native extension directclr._C through CMakeLists.txt.

Install into an environment that already has torch, without build isolation (an isolated build
would download another torch just to compile against it):

    pip install --no-build-isolation -e .
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cmake() -> str:
    """The venv's cmake (pip package) when there is one, else the one on PATH."""
    beside_python = Path(sys.executable).parent / "cmake"
    return str(beside_python) if beside_python.exists() else (shutil.which("cmake") or "cmake")


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _cmake()
        subprocess.run(
            [cmake, "-S", str(ROOT), "-B", str(build_dir),
             f"-DPython_EXECUTABLE={sys.executable}",
             f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
             "-DCMAKE_BUILD_TYPE=Release"],
            check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


setup(
    name="directclr",
    version="0.1.0",
    description="DirectCLR with fused Triton/C++ InfoNCE and spectrum kernels",
    packages=find_packages(include=["directclr", "directclr.*", "kernels", "kernels.*"]),
    ext_modules=[CMakeExtension("directclr._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    entry_points={"console_scripts": ["directclr = directclr.cli:main"]},
)
