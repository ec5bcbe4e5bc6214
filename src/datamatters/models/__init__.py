"""The model zoo: every network maps a batch of inputs to class logits."""
from datamatters.models.zoo import MLP, SmallCNN, build_model, cifar_resnet18, logistic

__all__ = ["MLP", "SmallCNN", "build_model", "cifar_resnet18", "logistic"]
