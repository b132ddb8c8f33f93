"""Reference networks of the L0 papers: an MLP and LeNet-5-Caffe."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "MLP", "ConvNet", "LeNet5Caffe"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class MLP(nn.Sequential):
    """Fully connected network (ReLU by default); linear layers are named ``fc1 .. fcK``.

    ``MLP(784, [300, 100], 10)`` is the 784-300-100 network of Louizos et al. (2018).
    Inputs of any shape ``(N, ...)`` are flattened.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, activation: str = "relu") -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} should be one of {sorted(ACTIVATIONS)}")
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        widths = [in_features, *hidden]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            layers[f"fc{i}"] = nn.Linear(a, b)
            layers[f"relu{i}" if activation == "relu" else f"act{i}"] = ACTIVATIONS[activation]()
        layers[f"fc{len(widths)}"] = nn.Linear(widths[-1], num_classes)
        super().__init__(layers)


class LeNet5Caffe(nn.Sequential):
    """LeNet-5-Caffe (20-50-800-500) for 1x28x28 inputs, as in Louizos et al. (2018).

    conv1 5x5x20 -> ReLU -> maxpool 2 -> conv2 5x5x50 -> ReLU -> maxpool 2 -> fc1 800->500
    -> ReLU -> fc2 500->classes.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, 20, 5),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(20, 50, 5),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
                flatten=nn.Flatten(),
                fc1=nn.Linear(800, 500),
                relu3=nn.ReLU(),
                fc2=nn.Linear(500, num_classes),
            )
        )


class ConvNet(nn.Sequential):
    """Convolutions (5x5, "same" padding, ReLU, 2x2 max-pooling) then fully connected layers.

    ``ConvNet((1, 28, 28), [32, 64], [1024], 10)`` is the MNIST network of TensorFlow's tutorial
    that Yoon & Hwang (2017) sparsify with CGES: conv 32-64, fc 1024-10. Layers are named
    ``conv1 .. convK`` and ``fc1 .. fcM``.
    """

    def __init__(
        self, input_shape: Sequence[int], channels: Sequence[int], hidden: Sequence[int], num_classes: int
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch = input_shape[0]
        for i, ch in enumerate(channels, start=1):
            layers[f"conv{i}"] = nn.Conv2d(in_ch, ch, 5, padding=2)
            layers[f"relu{i}"] = nn.ReLU()
            layers[f"pool{i}"] = nn.MaxPool2d(2)
            in_ch = ch
        layers["flatten"] = nn.Flatten()
        with torch.no_grad():
            features = nn.Sequential(layers)(torch.zeros(1, *input_shape)).shape[1]
        widths = [features, *hidden]
        for j, (a, b) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            layers[f"fc{j}"] = nn.Linear(a, b)
            layers[f"relu{len(channels) + j}"] = nn.ReLU()
        layers[f"fc{len(widths)}"] = nn.Linear(widths[-1], num_classes)
        super().__init__(layers)
