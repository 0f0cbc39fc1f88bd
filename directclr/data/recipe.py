"""The augmentation recipes, as numbers shared by the DALI and torchvision pipelines."""
from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    """Per-view augmentation parameters; index 0 is view 1, index 1 is view 2."""

    crop_scale: tuple[float, float]
    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    jitter_p: float
    grayscale_p: float
    blur_p: tuple[float, float]
    blur_sigma: tuple[float, float]
    solarize_p: tuple[float, float]
    solarize_threshold: int = 128  # on 0..255 pixel values
    flip_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


RECIPES = {
    # The official DirectCLR recipe (BYOL-style asymmetric views): ImageNet at 224 px.
    "directclr": Recipe(crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                        grayscale_p=0.2, blur_p=(1.0, 0.1), blur_sigma=(0.1, 2.0),
                        solarize_p=(0.0, 0.2)),
    # 32 px data (SimCLR's CIFAR habit): gentler crops and no blur, which erases 32 px images;
    # the asymmetric solarization of view 2 is kept.
    "small": Recipe(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                    grayscale_p=0.2, blur_p=(0.0, 0.0), blur_sigma=(0.1, 2.0),
                    solarize_p=(0.0, 0.2)),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name]
