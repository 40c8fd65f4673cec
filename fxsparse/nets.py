"""The small CIFAR-style networks ToST trains, as plain ``nn.Module`` constructors.

Use them as MODEL arguments (``fxsparse train fxsparse.nets:resnet20``) or directly::

    from fxsparse.nets import resnet20
    model = resnet20(num_classes=10, in_chans=1)   # MNIST-sized gray images

* ``resnet8/20/32/56``: He et al.'s CIFAR ResNets (depth 6n+2, BasicBlocks of 16-32-64 channels,
  3x3 stem, global average pool, one linear layer), as in ToST's
  ``pruning_techniques/models/ResNets.py`` (after Idelbayev's pytorch_resnet_cifar10). Shortcuts
  are **option A** by default, like ToST's and the paper's CIFAR models: where a block changes
  shape, the shortcut subsamples by 2 and zero-pads the new channels (no parameters).
  ``shortcut="B"`` uses a 1x1 convolution + BatchNorm instead. Init: Kaiming normal (fan_in) on
  every conv and linear weight, as ToST.
* ``resnet18``: the CIFAR ResNet-18 of ToST's ``models/ResNet.py`` (torchvision's ResNet-18 with a
  3x3 stride-1 stem and no max-pool; 1x1 conv + BatchNorm shortcuts; Kaiming fan_out init).

Every constructor takes ``num_classes`` and ``in_chans`` (1 for MNIST-like sets) and traces with
``fxsparse.trace``. The input size is free (global pooling); ``fxsparse_input_size`` is the CIFAR
one, used as the default example input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "ResNet18", "BasicBlock", "resnet8", "resnet20", "resnet32", "resnet56", "resnet18"]


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN, ReLU after each, the shortcut added before the second ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = 0  # option A: channels zero-padded on each side of the subsampled input
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                if stride != 2 or planes - in_planes != 2 * (planes // 4):
                    raise ValueError(f"option A shortcuts double the width and halve the size; got "
                                     f"{in_planes}->{planes} channels at stride {stride}")
                self.pad = planes // 4
            elif shortcut == "B":
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                              nn.BatchNorm2d(planes))
            else:
                raise ValueError(f"shortcut must be 'A' (subsample + zero channels) or 'B' (1x1 conv + BN); got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad:
            identity = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            identity = self.shortcut(x)
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet of depth ``6n+2``: stem 16, three stages of ``n`` blocks (16, 32, 64)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, shortcut: str = "A"):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 20, 32, 44, 56, 110); got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, in_planes, stages = (16, 32, 64), 16, []
        for i, planes in enumerate(widths):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if i > 0 and b == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        self.fxsparse_input_size = (in_chans, 32, 32)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, stages of 2 BasicBlocks (64-128-256-512)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes, stages = 64, []
        for i, planes in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride, "B"), BasicBlock(planes, planes, 1, "B")))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)
        self.fxsparse_input_size = (in_chans, 32, 32)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet8(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet-8 (one block per stage, 75k parameters)."""
    return CifarResNet(8, num_classes, in_chans, shortcut)


def resnet20(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet-20 (0.27M parameters)."""
    return CifarResNet(20, num_classes, in_chans, shortcut)


def resnet32(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet-32 (0.46M parameters)."""
    return CifarResNet(32, num_classes, in_chans, shortcut)


def resnet56(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet-56 (0.85M parameters)."""
    return CifarResNet(56, num_classes, in_chans, shortcut)


def resnet18(num_classes: int = 10, in_chans: int = 3) -> ResNet18:
    """CIFAR ResNet-18 (11.2M parameters)."""
    return ResNet18(num_classes, in_chans)
