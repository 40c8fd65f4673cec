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
* ``vgg11`` / ``vgg16``: the CIFAR VGG with BatchNorm of ToST's ``models/VGG.py``
  (configurations A and D, conv(bias)-BN-ReLU, a 2x2 max-pool after each stage but the last, a
  global average pool, one linear layer on the 512 final channels): a plain network with no
  shortcut of any kind. Init as ToST: Kaiming fan_out on convs, N(0, 0.01) on the classifier.
* ``mobilenetv2``: MobileNetV2 for 32x32 inputs (Sandler et al.'s inverted residuals with linear
  bottlenecks; as the common CIFAR port, the stem and the second stage keep stride 1, so the
  network downsamples 8x instead of 32x). ``stem_stride=2`` restores the ImageNet stem's stride
  (4x fewer activations everywhere): what the CPU accuracy study runs, to fit its budget.

Every constructor takes ``num_classes``, ``in_chans`` (1 for MNIST-like sets) and a ``width``
multiplier of every hidden layer's channels (1.0: the published network; CPU studies use
smaller ones), and traces with ``fxsparse.trace``. The input size is free (global pooling);
``fxsparse_input_size`` is the CIFAR one, used as the default example input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CifarResNet", "ResNet18", "BasicBlock", "CifarVGG", "InvertedResidual", "CifarMobileNetV2",
    "resnet8", "resnet20", "resnet32", "resnet56", "resnet18", "vgg11", "vgg16", "mobilenetv2",
]


def scaled(channels: int, width: float, divisor: int = 1) -> int:
    """``channels * width`` rounded to the nearest multiple of ``divisor`` (at least one of it),
    never more than 10% below the exact product (torchvision's rule for MobileNet widths)."""
    if width <= 0:
        raise ValueError(f"width must be > 0; got {width}")
    exact = channels * width
    out = max(divisor, int(exact + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * exact else out


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

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, shortcut: str = "A",
                 width: float = 1.0):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 20, 32, 44, 56, 110); got {depth}")
        n = (depth - 2) // 6
        # multiples of 4, so that option A's zero channels split evenly on both sides
        widths = tuple(scaled(c, width, 4) for c in (16, 32, 64))
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes, stages = widths[0], []
        for i, planes in enumerate(widths):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if i > 0 and b == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[2], num_classes)
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

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: float = 1.0):
        super().__init__()
        widths = tuple(scaled(c, width) for c in (64, 128, 256, 512))
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes, stages = widths[0], []
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride, "B"), BasicBlock(planes, planes, 1, "B")))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(widths[3], num_classes)
        self.fxsparse_input_size = (in_chans, 32, 32)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet8(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-8 (one block per stage, 75k parameters)."""
    return CifarResNet(8, num_classes, in_chans, shortcut, width)


def resnet20(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-20 (0.27M parameters)."""
    return CifarResNet(20, num_classes, in_chans, shortcut, width)


def resnet32(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-32 (0.46M parameters)."""
    return CifarResNet(32, num_classes, in_chans, shortcut, width)


def resnet56(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-56 (0.85M parameters)."""
    return CifarResNet(56, num_classes, in_chans, shortcut, width)


def resnet18(num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> ResNet18:
    """CIFAR ResNet-18 (11.2M parameters at width 1)."""
    return ResNet18(num_classes, in_chans, width)


# --------------------------------------------------------------------------- VGG
VGG_CONFIGS = {  # output channels of each 3x3 conv; "M" a 2x2 max-pool (none after the last stage)
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
}


class CifarVGG(nn.Module):
    """CIFAR VGG with BatchNorm: 3x3 conv-BN-ReLU stacks between 2x2 max-pools, then one linear
    layer. No shortcut of any kind, which is why ToST's ghost skips matter most here."""

    def __init__(self, depth: int = 16, num_classes: int = 10, in_chans: int = 3, width: float = 1.0):
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise ValueError(f"CIFAR VGG depth must be one of {sorted(VGG_CONFIGS)}; got {depth}")
        layers: list[nn.Module] = []
        channels = in_chans
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out = scaled(v, width)
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        self.fxsparse_input_size = (in_chans, 32, 32)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)  # 2x2 at 32x32 inputs, 1x1 at 28x28
        return self.classifier(out)


def vgg11(num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> CifarVGG:
    """CIFAR VGG-11 with BatchNorm (9.2M parameters at width 1)."""
    return CifarVGG(11, num_classes, in_chans, width)


def vgg16(num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> CifarVGG:
    """CIFAR VGG-16 with BatchNorm (14.7M parameters at width 1)."""
    return CifarVGG(16, num_classes, in_chans, width)


# --------------------------------------------------------------------------- MobileNetV2
# (expansion t, output channels c, blocks n, first stride s); stage 2 at stride 1 for 32x32 inputs
MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                      (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection, each with BatchNorm, ReLU6 after the
    first two; the input is added back when the shapes agree."""

    def __init__(self, in_planes: int, planes: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_planes * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, planes, 1, bias=False), nn.BatchNorm2d(planes)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_planes == planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs: 3x3 stride-1 stem, the seven inverted-residual stages (the
    second at stride 1), a 1x1 conv to 1280 channels, global average pool, one linear layer."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: float = 1.0, stem_stride: int = 1):
        super().__init__()
        stem = scaled(32, width, 8)
        layers: list[nn.Module] = [nn.Conv2d(in_chans, stem, 3, stride=stem_stride, padding=1, bias=False), nn.BatchNorm2d(stem),
                                   nn.ReLU6(inplace=True)]
        in_planes = stem
        for t, c, n, s in MOBILENETV2_STAGES:
            planes = scaled(c, width, 8)
            for i in range(n):
                layers.append(InvertedResidual(in_planes, planes, s if i == 0 else 1, t))
                in_planes = planes
        last = scaled(1280, max(1.0, width), 8)  # as torchvision: the head never narrows
        layers += [nn.Conv2d(in_planes, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)
        self.fxsparse_input_size = (in_chans, 32, 32)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(out)


def mobilenetv2(num_classes: int = 10, in_chans: int = 3, width: float = 1.0, stem_stride: int = 1) -> CifarMobileNetV2:
    """MobileNetV2 for 32x32 inputs (2.24M parameters at width 1)."""
    return CifarMobileNetV2(num_classes, in_chans, width, stem_stride)
