"""Segmentation heads Psi (paper eq. 2): backbone features -> per-patch class logits."""

from __future__ import annotations

import torch
from torch import nn


class SetrNaiveHead(nn.Module):
    """SETR-naive: 1x1 conv, BatchNorm, ReLU, 1x1 conv to the classes (about 0.21M for ViT-B)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, channels, kernel_size=1)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.act(self.bn(self.proj(features))))  # [B, D, h, w] -> [B, K, h, w]


class LinearHead(nn.Module):
    """BatchNorm and a 1x1 conv: the cheapest probe of what the features already separate."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn(features))  # [B, D, h, w] -> [B, K, h, w]


def build_head(kind: str, in_channels: int, num_classes: int, channels: int) -> nn.Module:
    if kind == "setr_naive":
        return SetrNaiveHead(in_channels, num_classes, channels)
    if kind == "linear":
        return LinearHead(in_channels, num_classes)
    raise ValueError(f"unknown head {kind!r}")
