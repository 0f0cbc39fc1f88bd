"""directclr: DirectCLR (Jing et al., ICLR 2022) with fused InfoNCE and spectrum kernels."""
from .gradcache import cached_step
from .infonce import DirectCLRLoss, infonce, infonce_reference
from .lars import LARS
from .spectrum import Spectrum, SpectrumAccumulator, embedding_spectrum

__all__ = ["DirectCLRLoss", "LARS", "Spectrum", "SpectrumAccumulator", "cached_step",
           "embedding_spectrum", "infonce", "infonce_reference"]
__version__ = "0.1.0"
