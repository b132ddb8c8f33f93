"""Reference networks: those of the L0 papers (an MLP, LeNet-5-Caffe), a ConvNet, and the CIFAR
ResNets with BatchNorm and residual adds that structured pruning is measured on."""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .specs import import_spec

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "RESNETS",
    "Attention",
    "BasicBlock",
    "ConvNet",
    "FeedForward",
    "LeNet5Caffe",
    "ResNet",
    "TransformerBlock",
    "ViT",
    "user_model",
]

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


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual add (He et al. 2016, fig. 2).

    The shortcut is the identity, or a 1x1 convolution with BatchNorm where the shape changes
    (stride or width; "option B").
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), bn=nn.BatchNorm2d(channels)
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNets of He et al. (2016, section 4.2) and their wide variant.

    A 3x3 stem of ``16 * width`` channels, three stages of ``blocks`` :class:`BasicBlock` s with
    ``16, 32, 64`` times ``width`` channels (the second and third start with stride 2), global
    average pooling and a linear classifier. ``ResNet.cifar(20)`` is ResNet-20 (``blocks =
    (depth - 2) / 6``); ``ResNet.wide(16, 4)`` is WRN-16-4 of Zagoruyko & Komodakis (2016)
    (``blocks = (depth - 4) / 6``, widths 64-128-256) in the post-activation form of He's
    blocks, without dropout. For 1- or 3-channel inputs of any size.
    """

    def __init__(self, blocks: int, width: int = 1, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if blocks < 1 or width < 1:
            raise ValueError(f"blocks={blocks}, width={width}: both should be >= 1")
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, previous = [], 16
        for i, channels in enumerate(widths):
            stage = [
                BasicBlock(previous if b == 0 else channels, channels, 2 if i and b == 0 else 1) for b in range(blocks)
            ]
            stages.append(nn.Sequential(*stage))
            previous = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    @classmethod
    def cifar(cls, depth: int, in_channels: int = 3, num_classes: int = 10) -> ResNet:
        if (depth - 2) % 6:
            raise ValueError(f"depth={depth}: a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110)")
        return cls((depth - 2) // 6, 1, in_channels, num_classes)

    @classmethod
    def wide(cls, depth: int, width: int, in_channels: int = 3, num_classes: int = 10) -> ResNet:
        if (depth - 4) % 6:
            raise ValueError(f"depth={depth}: a wide ResNet has depth 6n + 4 (10, 16, 22, 28)")
        return cls((depth - 4) // 6, width, in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# model.name -> how to build it for inputs of a shape and a number of classes
RESNETS = {
    "resnet20": lambda c, k: ResNet.cifar(20, c, k),
    "resnet32": lambda c, k: ResNet.cifar(32, c, k),
    "resnet56": lambda c, k: ResNet.cifar(56, c, k),
    "wrn16_4": lambda c, k: ResNet.wide(16, 4, c, k),
}


def user_model(spec: str, kwargs: dict[str, Any], input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """``module:Class`` imported from the Python path (name only code you trust, as for
    ``import``) and built with ``kwargs``; the constructor's parameters named ``input_shape``,
    ``in_channels``, ``in_features`` and ``num_classes`` that ``kwargs`` leaves out are filled
    from the data's sizes.

    Raises:
        ValueError: a module that does not import, a name that is not an ``nn.Module`` class,
            or a constructor that fails (one line each).
    """
    qualname = spec.partition(":")[2]
    obj = import_spec(spec)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ValueError(f"{qualname} is not a torch.nn.Module class")
    shape = tuple(input_shape)
    from_data = {
        "input_shape": shape,
        "in_channels": shape[0],
        "in_features": int(math.prod(shape)),
        "num_classes": num_classes,
    }
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    full = dict(kwargs)
    for name, value in from_data.items():
        if name in params and name not in full:
            full[name] = value
    try:
        model = obj(**full)
    except Exception as exc:  # noqa: BLE001 - the user's constructor: say which and why, in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{qualname}(...) failed ({first})") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{qualname}(...) did not return an nn.Module")
    return model


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output projections (so that a head
    is a block of rows of ``q``, ``k``, ``v`` and of columns of ``out``, and can be removed).

    ``heads`` heads of ``head_dim`` each; ``x`` is ``(batch, tokens, width)``.
    """

    def __init__(self, width: int, heads: int, head_dim: int | None = None) -> None:
        super().__init__()
        if heads < 1 or (head_dim is None and width % heads):
            raise ValueError(f"heads={heads}: should divide width={width} (or give head_dim)")
        self.heads = heads
        self.head_dim = head_dim or width // heads
        inner = self.heads * self.head_dim
        self.q, self.k, self.v = nn.Linear(width, inner), nn.Linear(width, inner), nn.Linear(width, inner)
        self.out = nn.Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        o = torch.nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class FeedForward(nn.Module):
    """The transformer's MLP: ``fc2(GELU(fc1(x)))``; its hidden neurons are units."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width), FeedForward(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small vision transformer (Dosovitskiy et al. 2021): non-overlapping ``patch`` x ``patch``
    patches embedded by a convolution, a class token and learned position embeddings, ``depth``
    pre-norm :class:`TransformerBlock` s, the class token's final norm to the classifier.
    ``ViT((1, 28, 28))`` is the Fashion-MNIST network of the configs: patch 4 (49 tokens),
    width 64, 4 heads, MLP 128, depth 4."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int = 10,
        patch: int = 4,
        width: int = 64,
        depth: int = 4,
        heads: int = 4,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        channels, height, breadth = input_shape
        if height % patch or breadth % patch:
            raise ValueError(f"patch={patch} should divide the image size {height}x{breadth}")
        tokens = (height // patch) * (breadth // patch)
        self.embed = nn.Conv2d(channels, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])
