"""Two-view augmentation pipelines (DALI and torchvision) over ImageFolder trees or WebDataset
shards, and dataset preparation."""
from .folder import ImageFolderIndex, epoch_order
from .loader import PretrainLoader, build_pretrain_loader, dali_available
from .prepare import prepare_fashion_mnist, prepare_synthetic, prepare_synthetic_splits
from .recipe import RECIPES, Recipe, get_recipe
from .shards import ShardIndex, write_shards

__all__ = ["ImageFolderIndex", "PretrainLoader", "RECIPES", "Recipe", "ShardIndex",
           "build_pretrain_loader", "dali_available", "epoch_order", "get_recipe",
           "prepare_fashion_mnist", "prepare_synthetic", "prepare_synthetic_splits",
           "write_shards"]
