"""Static INT8 quantization of an exported .onnx through ONNX Runtime's quantizer (no quantizer of ours).

    fp32 .onnx --quant_pre_process (shape inference, graph optimization)--> quantize_static (QDQ,
    per-channel int8 weights, uint8 activations, calibration on the model's own preprocessing of
    training images) --> int8 .onnx with polyprune's metadata plus `polyprune.int8`

`polyprune.int8` (JSON) records how: format, weight / activation types, per_channel, calibration
method and image count, the fp32 source, and the check below. The check runs the fp32 and the int8
model on the calibration images: `mean_abs_diff` (mean |p_fp32 - p_int8| of the probabilities) and
`dice_agreement` (mean Dice@0.5 between the two models' masks; both empty counts 1). An agreement
below `min_agreement` is a warning, never silence: the file is still written, for the user to judge.

Weights: 8-bit, or 7-bit (`reduce_range`). On an x86-64 CPU without VNNI, ONNX Runtime computes uint8 x
int8 products with VPMADDUBSW, whose 16-bit sums can saturate (its quantization docs say so); 7-bit
weights cannot. Measured on the shipped parent on an AVX2-only CPU, Kvasir Dice@0.5 (fp32 0.889): 8-bit
0.877, 7-bit 0.884. So the default (`reduce_range=None`) picks 7-bit on such a CPU, 8-bit elsewhere, and
a Predictor warns when an 8-bit file runs on a CPU where it can saturate.

Calibration method: "minmax" (ORT's default, the fastest to run), "percentile" (99.999 %, clips rare
outlier activations) or "entropy" (KL); `benchmarks/` compares them on the shipped parent.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polyprune.checks import check_choice, check_int, check_number, check_seed
from polyprune.errors import ConfigError, DataError, ModelFileError
from polyprune.files import atomic_path
from polyprune.progress import progress_bar

METHODS = ("minmax", "percentile", "entropy")
INT8_KEY = "polyprune.int8"


@dataclass
class QuantizeReport:
    path: Path
    source: Path
    method: str
    n_calib: int
    mean_abs_diff: float
    dice_agreement: float
    min_agreement: float
    file_bytes: int
    source_bytes: int
    seconds: float
    reduce_range: bool = False

    @property
    def ok(self) -> bool:
        return self.dice_agreement >= self.min_agreement

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "source": str(self.source), "ok": self.ok}


def calibration_images(
    data_dirs: Sequence[str | Path],
    n: int = 64,
    *,
    seed: int = 0,
    exclude_ids: Sequence[str | Path] = (),
) -> list[Path]:
    """`n` image files drawn (seeded) from the folders: use training images, never the test split
    (`exclude_ids` split files leave those ids out, as in `train`)."""
    from polyprune.data import find_samples, read_ids

    check_int("calib_n", n, low=1, high=10_000)
    check_seed(seed)
    if not data_dirs:
        raise ConfigError("INT8 calibration needs images: pass --calib-data DIR (training images)")
    excluded = {i for f in exclude_ids for i in read_ids(f)}
    samples = [s for d in data_dirs for s in find_samples(d, require_masks=False) if s.id not in excluded]
    if not samples:
        raise DataError(f"no calibration images in {', '.join(map(str, data_dirs))}")
    order = np.random.default_rng(seed).permutation(len(samples))[:n]
    return [samples[i].image for i in sorted(order.tolist())]


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol: the images through the model's preprocessing."""

    def __init__(self, images: Sequence[Path], spec: Any, input_name: str) -> None:
        self._images, self._spec, self._name = list(images), spec, input_name
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _gen(self) -> Iterator[dict[str, np.ndarray]]:
        from polyprune.data import preprocess_image
        from polyprune.images import read_image

        for p in self._images:
            yield {self._name: preprocess_image(read_image(p), self._spec)[None]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._gen()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def quantize_onnx(
    fp32_onnx: str | Path,
    out: str | Path,
    calib: Sequence[str | Path],
    *,
    method: str = "minmax",
    min_agreement: float = 0.98,
    threads: int | None = None,
    progress: bool = False,
    reduce_range: bool | None = None,
) -> QuantizeReport:
    """Write the static INT8 version of `fp32_onnx` to `out` (atomic); return what the check measured.

    `reduce_range`: 7-bit weights; None = on where this CPU's int8 kernels can saturate (no VNNI)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from polyprune.export import ort_session, set_onnx_metadata

    t0 = time.perf_counter()
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    images = [Path(p) for p in calib]
    meta = _check_quantize_inputs(fp32_onnx, out, images, method, min_agreement)
    seven_bit = int8_saturates_here() if reduce_range is None else bool(reduce_range)
    session = ort_session(fp32_onnx, threads)
    input_name = session.get_inputs()[0].name
    calib_method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]
    with tempfile.TemporaryDirectory(prefix="polyprune-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=True)
        except Exception:  # pre-processing is an optimization: quantize the graph as it is instead
            shutil.copy(fp32_onnx, pre)
        with (
            atomic_path(out, suffix=".onnx") as target,
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),  # ORT's calibrators print their progress
        ):
            warnings.simplefilter("ignore")
            quantize_static(
                str(pre),
                str(target),
                _Reader(images, meta.input, input_name),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=seven_bit,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=calib_method,
                extra_options={"CalibTensorRangeSymmetric": False, **_minmax_chunks(method, len(images))},
            )
            diff, agreement = _compare(session, ort_session(target, threads), images, meta.input, progress)
            record = {
                "format": "QDQ",
                "weights": f"int{7 if seven_bit else 8} per-channel",
                "reduce_range": seven_bit,
                "activations": "uint8",
                "calibration": {"method": method, "n_images": len(images)},
                "source": fp32_onnx.name,
                "mean_abs_diff": diff,
                "dice_agreement": agreement,
            }
            set_onnx_metadata(target, {**meta.raw, INT8_KEY: json.dumps(record)})
            nbytes = target.stat().st_size
    report = QuantizeReport(
        path=out,
        source=fp32_onnx,
        method=method,
        n_calib=len(images),
        mean_abs_diff=diff,
        dice_agreement=agreement,
        min_agreement=min_agreement,
        file_bytes=nbytes,
        source_bytes=fp32_onnx.stat().st_size,
        seconds=time.perf_counter() - t0,
        reduce_range=seven_bit,
    )
    if not report.ok:
        warnings.warn(
            f"{out}: INT8 masks agree with fp32 at Dice {agreement:.3f} on the calibration images (below "
            f"{min_agreement:g}; mean |prob diff| {diff:.4f}): check its test scores before deploying it",
            UserWarning,
            stacklevel=2,
        )
    return report


def _check_quantize_inputs(
    fp32_onnx: Path, out: Path, images: list[Path], method: str, min_agreement: float
) -> Any:
    """The fp32 file's polyprune metadata, once the options and files are known to work."""
    from polyprune.export import read_onnx_metadata

    check_choice("calib_method", method, METHODS)
    check_number("min_agreement", min_agreement, low=0, high=1)
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"INT8 target must end in .onnx, got {out}")
    meta = read_onnx_metadata(fp32_onnx)
    if meta.input is None:
        raise ModelFileError(f"{fp32_onnx} has no polyprune metadata: export it with polyprune first")
    if INT8_KEY in meta.raw:
        raise ConfigError(f"{fp32_onnx} is already INT8; quantize its fp32 source")
    if not images:
        raise ConfigError("INT8 calibration needs at least one image")
    if method != "minmax":
        _check_histogram_memory(fp32_onnx, len(images), method)
    return meta


def _minmax_chunks(method: str, n: int) -> dict[str, int]:
    """MinMax calibration folds the ranges in every few images instead of keeping all activations (162 MB
    an image at 352 px for the shipped parent). ONNX Runtime 1.32 raises "No data is collected" when the
    chunk size divides the image count exactly, so a size that does not is chosen. The histogram
    calibrators ignore the option (they keep everything: see _check_histogram_memory)."""
    if method != "minmax" or n <= 4:
        return {}
    return {"CalibMaxIntermediateOutputs": next(c for c in range(4, n) if n % c)}


def activation_bytes_per_image(onnx_path: Path) -> int:
    """fp32 bytes of every intermediate tensor of one image (static shapes, from ONNX shape inference)."""
    import onnx

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    total = 0
    for vi in [*proto.graph.value_info, *proto.graph.output]:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            total += int(np.prod(dims)) * 4
    return total


def _check_histogram_memory(onnx_path: Path, n_images: int, method: str) -> None:
    """ONNX Runtime's histogram calibrators (percentile, entropy) keep every intermediate tensor of every
    calibration image in memory, then copy them once more: refuse what would be killed for memory."""
    from polyprune.counting import available_memory_bytes

    per_image, avail = activation_bytes_per_image(onnx_path) * 2.5, available_memory_bytes()
    if avail is None or per_image * n_images <= 0.8 * avail:
        return
    fit = max(1, int(0.8 * avail // per_image))
    raise ConfigError(
        f"{method} calibration keeps every activation of every image in memory (ONNX Runtime's histogram "
        f"calibrator): {n_images} images need about {per_image * n_images / 2**30:.1f} GiB, "
        f"{avail / 2**30:.1f} GiB are available; use --calib-n {fit} or --calib-method minmax"
    )


def export_int8(
    model: str | Path,
    out: str | Path,
    calib_data: Sequence[str | Path],
    *,
    calib_n: int = 64,
    method: str = "minmax",
    exclude_ids: Sequence[str | Path] = (),
    seed: int = 0,
    size: int | None = None,
    min_agreement: float = 0.98,
    threads: int | None = None,
    progress: bool = False,
    reduce_range: bool | None = None,
) -> QuantizeReport:
    """`polyprune export --int8`: a .safetensors model is exported to fp32 ONNX first (checked against
    torch, in a temporary folder), an fp32 .onnx is quantized as it is."""
    from polyprune.export import export_onnx

    images = calibration_images(calib_data, calib_n, seed=seed, exclude_ids=exclude_ids)
    model = Path(model)
    if model.suffix.lower() == ".onnx":
        return quantize_onnx(model, out, images, method=method, min_agreement=min_agreement, threads=threads,
                             reduce_range=reduce_range)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="polyprune-fp32-") as tmp:
        fp32 = export_onnx(model, Path(tmp) / f"{model.stem}.onnx", size=size).path
        return quantize_onnx(fp32, out, images, method=method, min_agreement=min_agreement, threads=threads,
                             progress=progress, reduce_range=reduce_range)  # fmt: skip


def _compare(fp32: Any, int8: Any, images: Sequence[Path], spec: Any, progress: bool) -> tuple[float, float]:
    """(mean |p_fp32 - p_int8|, mean Dice@threshold between their masks) over `images`."""
    from polyprune.data import preprocess_image
    from polyprune.images import read_image

    name = fp32.get_inputs()[0].name
    diffs, dices = [], []
    with progress_bar(len(images), "int8 check", enabled=progress) as bar:
        for p in images:
            x = {name: preprocess_image(read_image(p), spec)[None]}
            a = 1 / (1 + np.exp(-fp32.run(None, x)[0].astype(np.float64)))
            b = 1 / (1 + np.exp(-int8.run(None, x)[0].astype(np.float64)))
            diffs.append(float(np.abs(a - b).mean()))
            ma, mb = a >= spec.threshold, b >= spec.threshold
            denom = ma.sum() + mb.sum()
            dices.append(1.0 if denom == 0 else float(2 * (ma & mb).sum() / denom))
            bar.advance()
    return float(np.mean(diffs)), float(np.mean(dices))


def int8_record(raw: dict[str, str]) -> dict[str, Any] | None:
    """The `polyprune.int8` record of an .onnx file's metadata, or None for fp32 files."""
    try:
        return json.loads(raw[INT8_KEY]) if INT8_KEY in raw else None
    except json.JSONDecodeError:
        return None


def int8_saturates_here() -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels can saturate on this CPU: x86-64 without VNNI (AVX2-only,
    or AVX-512 without VNNI), where 8-bit weights lose accuracy and 7-bit ones (`reduce_range`) do not."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # an older torch: assume the worst case, 7-bit is safe anywhere
        return True
    return not any(caps.get(k) for k in ("avx512_vnni", "avx_vnni", "amx_int8"))


def warn_if_int8_saturates(path: str | Path, raw: dict[str, str]) -> None:
    """A warning when an INT8 file with 8-bit weights runs on a CPU where its products can saturate."""
    record = int8_record(raw)
    if record is None or record.get("reduce_range") or not int8_saturates_here():
        return
    warnings.warn(
        f"{path}: INT8 with 8-bit weights on a CPU without VNNI, where ONNX Runtime's int8 products can "
        "saturate and cost Dice (about 1 point on the shipped parent): re-export it here with "
        "`polyprune export --int8` (7-bit weights on such a CPU) or with --reduce-range",
        UserWarning,
        stacklevel=3,
    )
