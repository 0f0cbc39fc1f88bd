"""`directclr info`: what is installed, which backends work here, and what fixes each missing
one."""
from __future__ import annotations

import importlib.util
import os
import platform
import sys
from importlib import metadata

# What pretrain, probe, spectrum and reproduce import beyond torch and torchvision ([train])
TRAINING_MODULES = ("numpy", "PIL", "simplejpeg", "tqdm", "matplotlib")
PACKAGES = ("torch", "triton", "torchvision", "numpy", "nvidia-dali-cuda130", "simplejpeg",
            "tensorboard")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_kernels(build: bool) -> tuple[bool, str]:
    from . import native
    path = native.library_path()
    if not path.exists() and not build:
        missing = native.missing_tools()
        if missing:
            return False, "cannot be built: needs " + " and ".join(missing)
        return True, ("not built yet: built on first use (or `directclr info --build`) in "
                      f"{path.parent}")
    try:
        native.load()
    except native.NativeUnavailable as err:
        return False, str(err)
    return True, f"built: {path}"


def _triton_cuda() -> tuple[bool, str]:
    import torch
    if _version("triton") is None:
        return False, "Triton is not installed: pip install triton (Linux, NVIDIA GPU)"
    if not torch.cuda.is_available():
        why = ("this torch has no CUDA: install a CUDA build of torch" if torch.version.cuda is None
               else "no CUDA device visible")
        return False, f"{why}; the Triton kernels need an NVIDIA GPU (sm_80+)"
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"{name} is sm_{major}{minor}; the Triton kernels need sm_80 or newer"
    return True, f"{name} (sm_{major}{minor}), {torch.cuda.device_count()} device(s)"


def training_stack() -> tuple[bool, str]:
    """Whether torchvision (pretrain, probe, spectrum, reproduce) imports beside this torch; a
    build made for another torch fails inside its own import (e.g. "operator torchvision::nms does
    not exist"), which is said here in one line instead of a traceback."""
    import torch
    installed = _version("torchvision")
    if installed is None:
        return False, ("torchvision is not installed: install it with torch, from the same "
                       "index (e.g. pip install torch torchvision --index-url "
                       "https://download.pytorch.org/whl/cpu), then pip install "
                       "'directclr[train]'")
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # a mismatched build raises RuntimeError, not ImportError
        reason = " ".join(str(err).split())[:120]
        return False, (f"torchvision {installed} does not work with torch {torch.__version__} "
                       f"({type(err).__name__}: {reason}): install the two together, from the "
                       "same index")
    missing = [module for module in TRAINING_MODULES if importlib.util.find_spec(module) is None]
    if missing:
        return False, (f"{', '.join(missing)} not installed: pip install 'directclr[train]' "
                       "(from a clone: pip install '.[train]')")
    return True, f"torchvision {installed} (pretrain, probe, spectrum, reproduce)"


def _dali() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False, ("not installed: pip install nvidia-dali-cuda130 (CUDA 13; "
                       "nvidia-dali-cuda120 for CUDA 12), or from a clone: pip install '.[dali]'")
    except Exception as err:  # a broken install raises more than ImportError
        return False, f"installed but does not import ({type(err).__name__}: {err})"
    return True, f"nvidia-dali {_version('nvidia-dali-cuda130') or '?'} (--loader dali)"


def report(build: bool = False) -> tuple[list[str], bool]:
    """Lines to print, and whether the CPU path has its fused kernels."""
    from . import __version__
    lines = [f"directclr {__version__} at {os.path.dirname(os.path.abspath(__file__))}",
             f"python {platform.python_version()} ({sys.executable}), {platform.machine()}, "
             f"{os.cpu_count()} CPUs"]
    import torch
    versions = {package: _version(package) for package in PACKAGES}
    versions["torch"] = torch.__version__  # with its build tag, e.g. +cu130 or +cpu
    lines += [f"  {package:22s} {version or 'not installed'}"
              for package, version in versions.items()]
    cpu_ok, cpu_note = _cpu_kernels(build)
    checks = [("C++ CPU kernels", cpu_ok, cpu_note + ("" if cpu_ok else
               "; meanwhile the loss and spectrum use plain PyTorch on CPU"))]
    checks.append(("Triton on CUDA", *_triton_cuda()))
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    checks.append(("TRITON_INTERPRET", interpret,
                   "on: backend='triton' runs on CPU tensors in the interpreter (tests only)"
                   if interpret else "off (set TRITON_INTERPRET=1 to run the Triton kernels on "
                   "CPU tensors, for tests)"))
    checks.append(("training stack", *training_stack()))
    checks.append(("DALI loader", *_dali()))
    lines.append("backends:")
    lines += [f"  [{'x' if ok else ' '}] {name:18s} {note}" for name, ok, note in checks]
    return lines, cpu_ok
