"""directclr: DirectCLR (Jing et al., ICLR 2022) with fused InfoNCE and spectrum kernels."""
from .infonce import DirectCLRLoss, infonce, infonce_reference
from .spectrum import Spectrum, SpectrumAccumulator, embedding_spectrum

__all__ = ["DirectCLRLoss", "Spectrum", "SpectrumAccumulator", "embedding_spectrum", "infonce",
           "infonce_reference"]
__version__ = "0.1.0"
