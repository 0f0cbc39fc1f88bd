"""torchvision backend: decode (damage reported as images.py says) and the recipe's transforms
in DataLoader workers that die with the trainer (workers.py)."""
from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from .images import CorruptImageError, decode_rgb, first_bad
from .recipe import Recipe
from .workers import worker_args


def view_transform(recipe: Recipe, view: int, image_size: int) -> T.Compose:
    """The torchvision form of view `view` (0 or 1) of the recipe."""
    ops = [T.RandomResizedCrop(image_size, scale=recipe.crop_scale,
                               interpolation=T.InterpolationMode.BICUBIC),
           T.RandomHorizontalFlip(recipe.flip_p),
           T.RandomApply([T.ColorJitter(*recipe.jitter)], p=recipe.jitter_p),
           T.RandomGrayscale(recipe.grayscale_p)]
    if recipe.blur_p[view] > 0:
        ops.append(T.RandomApply([PILGaussianBlur(recipe.blur_sigma)], p=recipe.blur_p[view]))
    if recipe.solarize_p[view] > 0:
        ops.append(T.RandomSolarize(recipe.solarize_threshold, p=recipe.solarize_p[view]))
    ops += [T.ToTensor(), T.Normalize(recipe.mean, recipe.std)]
    return T.Compose(ops)


class PILGaussianBlur:
    """Gaussian blur with sigma ~ U(sigma range), by PIL as the official code does: ~10x faster
    than T.GaussianBlur's 23-tap convolution on a tensor, which would bound the loader."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))


class TwoViewDataset(Dataset):
    """Item `epoch * n + i`: both views of image i of `index` (an ImageFolderIndex or a
    ShardIndex), augmented from a seed of (seed, epoch, i)."""

    def __init__(self, index, recipe: Recipe, image_size: int, seed: int):
        self.index, self.seed = index, seed
        self.views = (view_transform(recipe, 0, image_size), view_transform(recipe, 1, image_size))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int):
        epoch, i = divmod(key, len(self.index))
        image = decode_rgb(self.index.name(i), self.index.read(i))
        # torchvision's transforms draw from torch's global RNG: fork it so that the caller's
        # stream is untouched when there are no workers.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
            return self.views[0](image), self.views[1](image), self.index.labels[i]


class _ResumableSampler(Sampler):
    """Yields dataset keys of one epoch from a given batch on; set before each pass."""

    def __init__(self):
        self.keys: list[int] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class TorchvisionSource:
    def __init__(self, index, recipe: Recipe, image_size: int, num_threads: int, seed: int,
                 pin_memory: bool):
        self.dataset = TwoViewDataset(index, recipe, image_size, seed)
        self.sampler = _ResumableSampler()
        self.num_workers = num_threads
        self.pin_memory = pin_memory
        self._loader = None

    def _dataloader(self, batch_size: int) -> DataLoader:
        if self._loader is None:
            self._loader = DataLoader(
                self.dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                **worker_args(self.num_workers))
        return self._loader

    def batches(self, loader, epoch: int, start_batch: int):
        n = len(self.dataset)
        order = loader.order(epoch)[start_batch * loader.batch_size:]
        self.sampler.keys = (epoch * n + order).tolist()
        done = 0
        try:
            for batch in self._dataloader(loader.batch_size):
                yield batch
                done += 1
        except CorruptImageError:  # raised here, without workers: it names the file already
            raise
        except Exception as err:
            # A worker's error arrives as its traceback's text; decoding the batch that failed
            # here gives the one-line error that names the file.
            failed = order[done * loader.batch_size:(done + 1) * loader.batch_size].tolist()
            bad = first_bad(self.dataset.index, failed)
            if bad is None:
                raise
            raise bad from err
