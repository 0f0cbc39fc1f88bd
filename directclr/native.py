"""The C++ CPU kernels (kernels/cpu/), built with CMake on first use and cached.

`pip install` builds nothing native: the kernels compile against whatever torch is installed, so
an isolated build environment would have to download a second torch. Instead the first call that
needs them configures kernels/cpu/ with CMake into a cache folder keyed by the sources, the torch
version and the machine, loads the shared library with ``torch.ops.load_library`` (which
registers ``torch.ops.directclr_cpu``), and later processes reuse it. Concurrent first calls (the
ranks of a job) wait on one flock; a killed build leaves only a temporary folder, rebuilt next
time. Without cmake or a C++20 compiler, ``NativeUnavailable`` says which is missing and how to
get it; ``infonce`` and the spectrum then fall back to plain PyTorch (see their docs).
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

SOURCES = ("CMakeLists.txt", "infonce.cpp", "rows.cpp", "covariance.cpp")
LIBRARY = "libdirectclr_cpu.so"
COMPILERS = ("c++", "g++", "clang++")
log = logging.getLogger(__name__)


class NativeUnavailable(RuntimeError):
    """The C++ kernels cannot be built or loaded here; the message says what to install."""


def source_dir() -> Path:
    from . import kernels
    return Path(kernels.__file__).resolve().parent / "cpu"


def cache_dir() -> Path:
    """$DIRECTCLR_NATIVE_CACHE, else $XDG_CACHE_HOME/directclr/native (~/.cache/...)."""
    override = os.environ.get("DIRECTCLR_NATIVE_CACHE")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "directclr" / "native"


def cpu_features() -> str:
    """The CPU's model and instruction-set flags: the library is compiled for this CPU
    (-march=native), so a cache shared between different machines must not mix builds."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [line for line in info if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))  # once per kind, not once per core


def build_key() -> str:
    """Changes with any source byte, the torch build, the compiler and the CPU."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (source_dir() / name).read_bytes())
    for part in (torch.__version__, torch.utils.cmake_prefix_path, platform.machine(),
                 os.environ.get("CXX", ""), cpu_features()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def library_path() -> Path:
    return cache_dir() / build_key() / LIBRARY


def find_cmake() -> str | None:
    """The cmake beside this Python (the pip package), else the one on PATH."""
    beside_python = Path(sys.executable).parent / "cmake"
    return str(beside_python) if beside_python.exists() else shutil.which("cmake")


def find_compiler() -> str | None:
    wanted = os.environ.get("CXX")
    candidates = (wanted,) if wanted else COMPILERS
    return next((found for name in candidates if (found := shutil.which(name))), None)


def missing_tools() -> list[str]:
    """What the build needs and this machine lacks, each with the command that fixes it."""
    missing = []
    if find_cmake() is None:
        missing.append("cmake (pip install cmake)")
    if find_compiler() is None:
        missing.append("a C++20 compiler (e.g. apt install g++, or set CXX)")
    return missing


_loaded: Path | None = None
_unavailable: str | None = None


def load() -> Path:
    """Registers torch.ops.directclr_cpu, building the library first if this machine has no
    cached copy. Raises NativeUnavailable (one line) when that cannot be done."""
    global _loaded
    if _unavailable is not None:
        raise NativeUnavailable(_unavailable)
    if _loaded is not None:
        return _loaded
    path = library_path()
    if not path.exists():
        build(path)
    try:
        torch.ops.load_library(str(path))
    except OSError as err:
        raise NativeUnavailable(f"directclr's C++ CPU kernels at {path} do not load ({err}); "
                                f"delete {path.parent} to rebuild them") from None
    _loaded = path
    return path


def build(path: Path) -> None:
    """Configures and builds kernels/cpu into path's folder, under a flock shared by every
    process on this machine that builds the same key."""
    missing = missing_tools()
    if missing:
        raise NativeUnavailable("directclr's C++ CPU kernels need " + " and ".join(missing))
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(path.parent.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # another process may be building it: wait
        if path.exists():
            return
        work = path.parent.with_name(f"{path.parent.name}.build-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        log.warning("building directclr's C++ CPU kernels into %s (once per torch version; "
                    "16 s on 2 cores)", path.parent)
        build_log = work / "build.log"
        with open(build_log, "w") as out:
            steps = ([find_cmake(), "-S", str(source_dir()), "-B", str(work),
                      f"-DTORCH_CMAKE_PREFIX={torch.utils.cmake_prefix_path}",
                      f"-DCMAKE_CXX_COMPILER={find_compiler()}", "-DCMAKE_BUILD_TYPE=Release"],
                     [find_cmake(), "--build", str(work), "-j", str(os.cpu_count() or 1)])
            for step in steps:
                if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode:
                    raise NativeUnavailable(f"building directclr's C++ CPU kernels failed; "
                                            f"see {build_log}")
        if not (work / LIBRARY).exists():
            raise NativeUnavailable(f"the build did not produce {LIBRARY}; see {build_log}")
        shutil.rmtree(path.parent, ignore_errors=True)  # a folder whose library was deleted
        os.replace(work, path.parent)  # the finished folder appears whole, or not at all
    finally:
        os.close(lock_fd)


def available() -> bool:
    """Whether torch.ops.directclr_cpu can be used here (building it if need be). The first
    failure is logged once, with what fixes it; callers then take their PyTorch path."""
    global _unavailable
    if _unavailable is None:
        try:
            load()
        except NativeUnavailable as err:
            _unavailable = str(err)
            log.warning("%s; falling back to plain PyTorch on CPU (slower, see "
                        "`directclr info`)", err)
    return _loaded is not None
