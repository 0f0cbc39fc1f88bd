"""directclr: DirectCLR (Jing et al., ICLR 2022) with fused InfoNCE and spectrum kernels."""
from pathlib import Path as _Path

# kernels/ sits at the repository's top and is installed as directclr.kernels (package-dir in
# pyproject.toml). A checkout used without installing (PYTHONPATH=., as on a GPU host with a
# fixed image) finds it under the same name: the checkout's top joins this package's path.
_CHECKOUT = _Path(__file__).resolve().parent.parent
if (not (_Path(__file__).parent / "kernels").is_dir()
        and (_CHECKOUT / "kernels" / "__init__.py").is_file()):
    __path__.append(str(_CHECKOUT))
from .gradcache import cached_step
from .infonce import DirectCLRLoss, infonce, infonce_reference
from .lars import LARS
from .spectrum import Spectrum, SpectrumAccumulator, embedding_spectrum

__all__ = ["DirectCLRLoss", "LARS", "Spectrum", "SpectrumAccumulator", "cached_step",
           "embedding_spectrum", "infonce", "infonce_reference"]
__version__ = "0.1.0"
