"""directclr: DirectCLR (Jing et al., ICLR 2022) with fused InfoNCE and spectrum kernels."""
import importlib
import sys
import types
from pathlib import Path as _Path

# kernels/ sits at the repository's top and is installed as directclr.kernels (package-dir in
# pyproject.toml). A checkout used without installing (PYTHONPATH=., as on a GPU host with a
# fixed image) finds it under the same name: the checkout's top joins this package's path.
_CHECKOUT = _Path(__file__).resolve().parent.parent
if (not (_Path(__file__).parent / "kernels").is_dir()
        and (_CHECKOUT / "kernels" / "__init__.py").is_file()):
    __path__.append(str(_CHECKOUT))

# The public names, by the module that defines them. They load on first use (PEP 562), so that
# importing the package imports no torch: the command line (directclr.cli) starts in a few
# milliseconds and catches a stop signal before the seconds torch takes to import.
_EXPORTS = {"DirectCLRLoss": "infonce", "infonce": "infonce", "infonce_reference": "infonce",
            "LARS": "lars", "Spectrum": "spectrum", "SpectrumAccumulator": "spectrum",
            "embedding_spectrum": "spectrum", "cached_step": "gradcache"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """`directclr.infonce` is the loss function, although a submodule has the same name: the
    import system sets a package's attribute to each submodule it loads, which would replace the
    function once anything imported directclr.infonce (the module). A function assigned to it
    (a test's mock) is kept."""

    @property
    def infonce(self):
        if "_infonce" in self.__dict__:
            return self.__dict__["_infonce"]
        from .infonce import infonce
        return infonce

    @infonce.setter
    def infonce(self, value) -> None:
        if not isinstance(value, types.ModuleType):
            self.__dict__["_infonce"] = value

    @infonce.deleter
    def infonce(self) -> None:
        self.__dict__.pop("_infonce", None)


sys.modules[__name__].__class__ = _Package
