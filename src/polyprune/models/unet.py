"""The classic UNet (Ronneberger et al. 2015) with BatchNorm, sized for pruning.

Layout for depth 4 (names are the keys of `widths`, each the out-channels of one conv):

    enc0 -> enc1 -> enc2 -> enc3 -> bottleneck          (each: conv1-bn1-relu-conv2-bn2-relu, maxpool between)
    up3(bottleneck) ++ enc3 -> dec3 ; up2(dec3) ++ enc2 -> dec2 ; ... ; dec0 -> head (1x1, out_channels)

`upsample="transpose"` uses ConvTranspose2d(k=2, s=2); `"bilinear"` a 1x1 conv followed by bilinear x2
(conv first: it runs at the low resolution, so it is the cheaper order). `++` is a channel concat with
the skip first. Every conv width can be set on its own through `widths`, which is what a pruned model's
config holds; `config()` reads the widths back from the modules, so it stays true after physical pruning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from polyprune.errors import ConfigError
from polyprune.models.registry import MAX_WIDTH, check_channels, merge_widths, register_model

MAX_DEPTH = 8  # 2**8 = 256 px stride: deeper makes no sense for images, and a huge depth hangs the build


class DoubleConv(nn.Module):
    """(3x3 conv, BN, ReLU) x 2. Convs have no bias: BN follows."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(x)), inplace=True)


class BilinearUp(nn.Module):
    """1x1 conv (channel change) then bilinear x2."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=2.0, mode="bilinear", align_corners=False)


def default_widths(base_width: int, depth: int) -> dict[str, int]:
    """Widths of the unpruned UNet: level i has base_width * 2**i channels everywhere."""
    w: dict[str, int] = {}
    for i in range(depth):
        c = base_width * 2**i
        w[f"enc{i}.conv1"] = c
        w[f"enc{i}.conv2"] = c
        w[f"up{i}"] = c
        w[f"dec{i}.conv1"] = c
        w[f"dec{i}.conv2"] = c
    c = base_width * 2**depth
    w["bottleneck.conv1"] = c
    w["bottleneck.conv2"] = c
    return w


@register_model("unet")
class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        base_width: int = 16,
        depth: int = 4,
        upsample: str = "transpose",
        widths: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if upsample not in ("transpose", "bilinear"):
            raise ConfigError(f"upsample must be 'transpose' or 'bilinear', got {upsample!r}")
        check_channels("UNet", in_channels, out_channels)
        for name, v, top in (("base_width", base_width, MAX_WIDTH // 16), ("depth", depth, MAX_DEPTH)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
                raise ConfigError(f"UNet {name} must be an int in 1..{top}, got {v!r}")
        w = merge_widths("UNet", default_widths(base_width, depth), widths)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.base_width, self.depth, self.upsample = base_width, depth, upsample

        prev = in_channels
        for i in range(depth):
            setattr(self, f"enc{i}", DoubleConv(prev, w[f"enc{i}.conv1"], w[f"enc{i}.conv2"]))
            prev = w[f"enc{i}.conv2"]
        self.bottleneck = DoubleConv(prev, w["bottleneck.conv1"], w["bottleneck.conv2"])
        prev = w["bottleneck.conv2"]
        for i in reversed(range(depth)):
            up_out = w[f"up{i}"]
            up: nn.Module = (
                nn.ConvTranspose2d(prev, up_out, 2, stride=2)
                if upsample == "transpose"
                else BilinearUp(prev, up_out)
            )
            setattr(self, f"up{i}", up)
            skip = w[f"enc{i}.conv2"]
            setattr(self, f"dec{i}", DoubleConv(skip + up_out, w[f"dec{i}.conv1"], w[f"dec{i}.conv2"]))
            prev = w[f"dec{i}.conv2"]
        self.head = nn.Conv2d(prev, out_channels, 1)

    @property
    def stride(self) -> int:
        """Input height and width must be multiples of this."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i in range(self.depth):
            x = getattr(self, f"enc{i}")(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for i in reversed(range(self.depth)):
            x = getattr(self, f"up{i}")(x)
            x = getattr(self, f"dec{i}")(torch.cat([skips[i], x], dim=1))
        return self.head(x)

    def widths(self) -> dict[str, int]:
        """Current out-channels of every conv, read from the modules (true after physical pruning)."""
        w: dict[str, int] = {}
        for i in range(self.depth):
            for part in ("enc", "dec"):
                block = getattr(self, f"{part}{i}")
                w[f"{part}{i}.conv1"] = block.conv1.out_channels
                w[f"{part}{i}.conv2"] = block.conv2.out_channels
            up = getattr(self, f"up{i}")
            w[f"up{i}"] = up.out_channels if isinstance(up, nn.ConvTranspose2d) else up.conv.out_channels
        w["bottleneck.conv1"] = self.bottleneck.conv1.out_channels
        w["bottleneck.conv2"] = self.bottleneck.conv2.out_channels
        return w

    def config(self) -> dict[str, Any]:
        return {
            "name": "unet",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "base_width": self.base_width,
            "depth": self.depth,
            "upsample": self.upsample,
            "widths": self.widths(),
        }
