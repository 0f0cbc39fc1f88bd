"""The small embedding networks and batch that test_gradcache.py and its 2-rank worker share."""
import torch
from torch import nn

N, CHANNELS, SIDE = 12, 3, 8


def build_net(batchnorm: bool, seed: int = 0) -> nn.Module:
    """A conv net ending in 16-d embeddings, with or without BatchNorm."""
    torch.manual_seed(seed)
    norm = [nn.BatchNorm2d(8)] if batchnorm else []
    return nn.Sequential(nn.Conv2d(CHANNELS, 8, 3, padding=1), *norm, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16))


def make_batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(N, CHANNELS, SIDE, SIDE, generator=gen),
            torch.randn(N, CHANNELS, SIDE, SIDE, generator=gen))
