"""Networks by name. ``build_model(name, input_shape, num_classes, **kw)`` is what configs call."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from datamatters.errors import UserError
from datamatters.models.transformer import ref_mlp, transformer


class MLP(nn.Module):
    """Flatten, then ``hidden`` ReLU layers (with optional dropout, used by MC-dropout selection), then logits."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128,),
                 dropout: float = 0.0):
        super().__init__()
        dims = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def logistic(input_shape: Sequence[int], num_classes: int) -> MLP:
    """Multinomial logistic regression (an MLP without hidden layers)."""
    return MLP(input_shape, num_classes, hidden=())


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; works for any (C, H, W) input (digits 8x8, MNIST 28x28, CIFAR 32x32)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32),
                 dropout: float = 0.0):
        super().__init__()
        c_in = input_shape[0]
        blocks: list[nn.Module] = []
        for c in channels:
            blocks += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            c_in = c
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout) if dropout > 0 else nn.Identity(), nn.Linear(c_in * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1, batchnorm: bool = True, residual: bool = True):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not batchnorm)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=not batchnorm)
        self.bn2 = norm(c_out)
        self.residual = residual
        self.shortcut = nn.Sequential()
        if residual and (stride != 1 or c_in != c_out):
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=not batchnorm), norm(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return torch.relu(out)


class CifarResNet18(nn.Module):
    """ResNet18 for 32x32 inputs: 3x3 stem, no max-pool (the variant RHO-LOSS and most CIFAR work use).
    ``batchnorm``/``residual`` switches give the dynamics ablations."""

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, width: int = 64,
                 batchnorm: bool = True, residual: bool = True):
        super().__init__()
        c_in = input_shape[0]
        self.conv1 = nn.Conv2d(c_in, width, 3, 1, 1, bias=not batchnorm)
        self.bn1 = nn.BatchNorm2d(width) if batchnorm else nn.Identity()
        layers, c = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(c, width * mult, stride, batchnorm, residual),
                                        BasicBlock(width * mult, width * mult, 1, batchnorm, residual)))
            c = width * mult
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def cifar_resnet18(input_shape=(3, 32, 32), num_classes=10, **kw) -> CifarResNet18:
    return CifarResNet18(input_shape, num_classes, **kw)


def torchvision_model(input_shape, num_classes: int, arch: str = "resnet50", pretrained_path: str | None = None, **kw):
    """Any ``torchvision.models`` architecture by name, random init (no downloads), optional local weights file."""
    import torchvision

    if not hasattr(torchvision.models, arch):
        raise UserError(f"torchvision has no model {arch!r}")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, **kw)
    if pretrained_path:
        load_pretrained(model, pretrained_path)
    return model


def load_pretrained(model: nn.Module, path: str) -> None:
    """Load a local weights file (e.g. ImageNet ResNet-50 for Clothing-1M). Tensors whose shape differs (the
    classifier head when the class count changes) keep their fresh init; everything else must match exactly."""
    from pathlib import Path

    if not Path(path).is_file():
        raise UserError(f"pretrained weights not found: {path}. Save them there (e.g. torch.save(torchvision.models."
                        f"resnet50(weights='DEFAULT').state_dict(), '{path}') on a machine with internet) or set "
                        f"model.pretrained_path=null for random init.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    fresh = [k for k in own if k not in kept]
    unknown = [k for k in state if k not in own]
    if unknown:
        raise UserError(f"{path} has weights this model does not: {unknown[:5]}; is it for another architecture?")
    model.load_state_dict({**own, **kept})
    if fresh:
        print(f"pretrained weights loaded from {path}; freshly initialised: {fresh}")


def hf_classifier(input_shape, num_classes: int, path: str | None = None, config: dict | None = None):
    """HF sequence classifier from a local path (offline) or random init from a config dict."""
    from datamatters.models.text import HFClassifier

    return HFClassifier(num_classes=num_classes, path=path, config=config)


REGISTRY = {
    "mlp": MLP,
    "logistic": logistic,
    "cnn": SmallCNN,
    "resnet18": cifar_resnet18,
    "torchvision": torchvision_model,
    "hf": hf_classifier,
    "transformer": transformer,
    "ref_mlp": ref_mlp,
}


def register(name: str, factory) -> None:
    """Add a model factory ``factory(input_shape, num_classes, **kw)`` to the zoo."""
    REGISTRY[name] = factory


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kw) -> nn.Module:
    if name not in REGISTRY:
        raise UserError(f"unknown model {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](tuple(input_shape), int(num_classes), **kw)
