"""directclr: DirectCLR (Jing et al., ICLR 2022) with fused InfoNCE and spectrum kernels."""
from .infonce import DirectCLRLoss, infonce, infonce_reference

__all__ = ["DirectCLRLoss", "infonce", "infonce_reference"]
__version__ = "0.1.0"
