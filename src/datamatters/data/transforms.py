"""Image transforms shared by the real-data loaders.

In-memory image sets (CIFAR, MNIST) keep their pixels as ``uint8`` and normalise on access through
:class:`NormalizedImages`, so evaluation batches are gathered and normalised as whole tensors (the fast
``TensorIndexedDataset`` path) without holding a float copy of the dataset. Augmentation then works on normalised
tensors: :class:`RandomCropFlip` pads with the normalised value of a black pixel, which is exactly torchvision's
``RandomCrop(padding, fill=0)`` + ``RandomHorizontalFlip`` applied before ``Normalize`` (the reference's order).
Image-folder sets (CINIC-10, Clothing-1M) decode PIL images and use the usual torchvision pipelines.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from datamatters.data.indexed import TensorBase

CIFAR_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the reference's CIFAR-10/100 normalisation
CINIC_MEAN_STD = ((0.47889522, 0.47227842, 0.43047404), (0.24205776, 0.23828046, 0.25874835))
MNIST_MEAN_STD = ((0.1307,), (0.3081,))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class NormalizedImages:
    """A read-only view of ``uint8`` images (n, C, H, W) that returns ``(x / 255 - mean) / std`` as float32.

    Indexing accepts what tensors accept (an int, a slice, an index tensor/array) and normalises only what it returns.
    """

    def __init__(self, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (n, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if not (len(mean) == len(std) == images.shape[1]):
            raise ValueError(f"mean/std need {images.shape[1]} channels, got {len(mean)}/{len(std)}")
        self.raw = images
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        return self.raw.shape

    def __len__(self) -> int:
        return self.raw.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx)
        return self.raw[idx].float().div_(255.0).sub_(self.mean).div_(self.std)

    def black(self) -> tuple[float, ...]:
        """The normalised value of a zero pixel, per channel (the padding fill of an augmentation)."""
        return tuple((-self.mean / self.std).flatten().tolist())


class ImageTensorBase(TensorBase):
    """A ``TensorBase`` over ``uint8`` images normalised on access; items are ``(float image, label)``."""

    def __init__(self, images: torch.Tensor, targets, mean: Sequence[float], std: Sequence[float]):
        self.X = NormalizedImages(images, mean, std)
        self.y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        if len(self.X) != len(self.y):
            raise ValueError(f"{len(self.X)} images but {len(self.y)} labels")


class RandomCropFlip:
    """Zero-pad by ``padding`` (in pixel space: ``fill`` is the normalised black), take a random ``size`` crop and flip
    horizontally with probability 1/2. Works on one (C, H, W) image or a batch (B, C, H, W), one draw per image."""

    def __init__(self, size: int | tuple[int, int], padding: int = 4, fill: Sequence[float] = (0.0,), flip: bool = True):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.padding, self.flip = int(padding), bool(flip)
        self.fill = torch.tensor(fill, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim == 3:
            return self._one(x, generator)
        xb = x
        b, c, h, w = xb.shape
        p, (th, tw) = self.padding, self.size
        padded = self.fill.to(xb).expand(c, h + 2 * p, w + 2 * p).repeat(b, 1, 1, 1)
        padded[:, :, p:p + h, p:p + w] = xb
        i = torch.randint(0, h + 2 * p - th + 1, (b,), generator=generator)
        j = torch.randint(0, w + 2 * p - tw + 1, (b,), generator=generator)
        rows = (i.view(b, 1) + torch.arange(th)).to(xb.device)  # (b, th)
        cols = (j.view(b, 1) + torch.arange(tw)).to(xb.device)  # (b, tw)
        if self.flip:
            flipped = torch.rand(b, generator=generator) < 0.5
            cols = torch.where(flipped.view(b, 1).to(cols.device), cols.flip(1), cols)
        out = padded[torch.arange(b, device=xb.device).view(b, 1, 1, 1), torch.arange(c, device=xb.device).view(1, c, 1, 1),
                     rows.view(b, 1, th, 1), cols.view(b, 1, 1, tw)]
        return out

    def _one(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One image by slicing (the per-item DataLoader path: a few small ops instead of a gather)."""
        c, h, w = x.shape
        p, (th, tw) = self.padding, self.size
        padded = self.fill.to(x).expand(c, h + 2 * p, w + 2 * p).clone()
        padded[:, p:p + h, p:p + w] = x
        i, j = torch.randint(0, h + 2 * p - th + 1, (2,), generator=generator).tolist()
        if w != h:
            j = int(torch.randint(0, w + 2 * p - tw + 1, (1,), generator=generator))
        out = padded[:, i:i + th, j:j + tw]
        if self.flip and float(torch.rand(1, generator=generator)) < 0.5:
            out = out.flip(-1)
        return out

    def __repr__(self) -> str:
        return f"RandomCropFlip(size={self.size}, padding={self.padding}, flip={self.flip})"


def pil_pipeline(mean_std, train: bool, resize: int | None = None, crop: int | None = None,
                 random_crop_padding: int | None = None, train_crop: str = "random"):
    """torchvision transforms for PIL images: optional resize to ``resize``x``resize``, then a crop of ``crop`` (centre
    for eval; ``train_crop`` = random | center for training), a random horizontal flip for training, then normalise.
    ``random_crop_padding`` gives CIFAR-type RandomCrop(size, padding) when training without resizing."""
    from torchvision import transforms as T

    steps = []
    if resize is not None:
        steps.append(T.Resize((resize, resize)))
    if train:
        if random_crop_padding is not None:
            steps.append(T.RandomCrop(crop, padding=random_crop_padding))
        elif crop is not None:
            steps.append(T.RandomCrop(crop) if train_crop == "random" else T.CenterCrop(crop))
        steps.append(T.RandomHorizontalFlip())
    elif crop is not None and random_crop_padding is None:
        steps.append(T.CenterCrop(crop))
    steps += [T.ToTensor(), T.Normalize(*mean_std)]
    return T.Compose(steps)
