"""A ViT as an ONNX file for onnxruntime, with its preprocessing beside it.

The exported graph is exactly ``ViT.forward`` (arXiv:2010.11929, Eq. 1-4): its one input ``images`` is the
*preprocessed* float tensor (B, C, H, W), pixels already resized, cropped and normalised as the checkpoint's
:class:`~vitlab.config.Preprocessing` says, and the batch axis is dynamic. Because resizing and normalising are
not in the graph, they travel with it: ``FILE.preprocessing.json`` beside ``FILE.onnx`` (and the same JSON in the
model's own ``metadata_props`` under ``"vitlab"``, so the ``.onnx`` alone still describes itself).

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. With torch 2.14 it exports every
position-embedding type (the relative bias is constant-folded into each attention's float mask), needs no
``onnxscript``, and is several times faster. The torch.export-based exporter (``exporter="dynamo"``, needs
``onnxscript``) works for all types but ``relative``, where its decomposition of ``scaled_dot_product_attention``
with a float mask fails; it is kept as an option for when the TorchScript exporter is gone.

Every export is checked against torch with onnxruntime on random inputs at two batch sizes; a file that
disagrees by more than ``atol`` is never written. ``int8=True`` adds onnxruntime's *dynamic* quantisation:
int8 weights (per output channel, in 7 bits so that CPUs without VNNI do not saturate) for every MatMul / Gemm,
activations quantised per batch at run time. Dynamic rather than static because export takes a checkpoint and no
data, so there is nothing to calibrate on; because in a ViT nearly all FLOPs are in those matrix products; and
because static per-tensor activation scales suffer from the large outliers of transformer activations, which
per-batch scales follow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from vitlab.config import Preprocessing, ViTConfig
from vitlab.io import atomic_path, atomic_write_json
from vitlab.model import ViT

if TYPE_CHECKING:
    import onnxruntime

INSTALL_HINT = "pip install 'vitlab[export]'"
FORMAT_TAG = "vitlab-onnx"
FORMAT_VERSION = 1
METADATA_KEY = "vitlab"
INPUT_NAME = "images"
MIN_OPSET = 14  # scaled_dot_product_attention exports from opset 14 on
DEFAULT_OPSET = 17  # the first with LayerNormalization as one op
DEFAULT_ATOL = 1e-4
TRACE_BATCH = 2  # traced at 2, checked at 1 and N: a batch size baked into the graph would show
Exporter = Literal["torchscript", "dynamo"]


class ExportError(ValueError):
    """Bad input to an export (an unwritable path, an unsupported opset, a file that is not a vitlab export)."""


class ExportCheckError(RuntimeError):
    """The exported model disagrees with torch by more than the tolerance; nothing was written."""

    def __init__(self, message: str, errors: dict[int, float]) -> None:
        super().__init__(message)
        self.errors = errors


class MissingDependencyError(ImportError):
    """onnx / onnxruntime (or onnxscript, for the dynamo exporter) is not installed."""


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or :class:`MissingDependencyError` naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(
            f"ONNX export and inference need the packages onnx and onnxruntime ({e.name or e} is missing): "
            f"{INSTALL_HINT}"
        ) from e
    return onnx, onnxruntime


def preprocessing_path(onnx_path: str | Path) -> Path:
    """``dir/NAME.onnx`` -> ``dir/NAME.preprocessing.json``."""
    p = Path(onnx_path)
    stem = p.stem if p.suffix == ".onnx" else p.name
    return p.with_name(f"{stem}.preprocessing.json")


def export_metadata(model: ViT, *, opset: int, exporter: Exporter, quantization: str | None) -> dict[str, Any]:
    """Everything a consumer of the ONNX file needs: the preprocessing, class names and architecture."""
    from vitlab import __version__

    c, pre = model.config, model.preprocessing
    output = "logits" if c.num_classes else "features"
    width = c.num_classes or (c.representation_size or c.hidden_dim)
    return {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "vitlab_version": __version__,
        **pre.to_dict(),  # image_size, mean, std, interpolation, crop_pct (crop_mode unless "center")
        "class_names": model.class_names,
        "in_channels": c.in_channels,
        "num_classes": c.num_classes,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", c.in_channels, *c.image_size],
            "dtype": "float32",
            "meaning": "images resized and centre-cropped to image_size, then (pixel / 255 - mean) / std",
        },
        "output": {"name": output, "shape": ["batch", width], "dtype": "float32"},
        "architecture": c.to_dict(),
        "opset": opset,
        "exporter": exporter,
        "quantization": quantization,
    }


# -------------------------------------------------------------------------------------------- export
@dataclass
class ExportReport:
    """What :func:`export` wrote and how well it agrees with torch."""

    path: Path
    preprocessing_path: Path
    batch_sizes: tuple[int, ...]
    fp32_errors: dict[int, float]  # batch size -> max |onnxruntime fp32 - torch| over the logits
    int8_top1_agreement: float | None = None  # fraction of check inputs where int8 and fp32 agree on top-1
    int8_max_abs_diff: float | None = None  # max |int8 - fp32| over the logits
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def fp32_max_abs_error(self) -> float:
        return max(self.fp32_errors.values())


def export(
    model: ViT,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    int8: bool = False,
    batch_check: int = 3,
    atol: float = DEFAULT_ATOL,
    exporter: Exporter = "torchscript",
    seed: int = 0,
) -> ExportReport:
    """Export ``model`` to ONNX at ``out`` (the int8 model if ``int8``) and its preprocessing JSON beside it.

    The fp32 graph is compared with torch on random inputs at batch sizes 1 and ``batch_check``; if the largest
    absolute difference exceeds ``atol`` an :class:`ExportCheckError` is raised and nothing is written. Both
    files are written atomically (a temporary file, then a rename).
    """
    require_onnx()
    out = Path(out)
    _check_arguments(model, out, opset=opset, batch_check=batch_check, atol=atol, exporter=exporter)
    was_training = model.training
    model.eval()
    try:
        return _export(
            model, out, opset=opset, int8=int8, batch_check=batch_check, atol=atol, exporter=exporter, seed=seed
        )
    finally:
        model.train(was_training)


def _export(
    model: ViT, out: Path, *, opset: int, int8: bool, batch_check: int, atol: float, exporter: Exporter, seed: int
) -> ExportReport:
    quantization = "dynamic-int8 (MatMul/Gemm weights int8 in 7 bits per channel, activations uint8 per batch)"
    meta = export_metadata(model, opset=opset, exporter=exporter, quantization=quantization if int8 else None)
    batch_sizes = (1, batch_check)
    inputs = _check_inputs(model.config, batch_sizes, seed)
    with atomic_path(out) as final, tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as work:
        fp32 = Path(work) / "fp32.onnx" if int8 else final
        _torch_export(model, fp32, opset=opset, exporter=exporter, output_name=meta["output"]["name"])
        _set_metadata(fp32, {**meta, "quantization": None} if int8 else meta)
        with torch.no_grad():
            expected = [model(x).numpy() for x in inputs]
        session = _session(fp32)
        fp32_out = [_run(session, x.numpy()) for x in inputs]
        errors = {b: float(np.abs(o - e).max()) for b, o, e in zip(batch_sizes, fp32_out, expected, strict=True)}
        if max(errors.values()) > atol or not all(np.isfinite(list(errors.values()))):
            shown = ", ".join(f"batch {b}: {e:.3g}" for b, e in errors.items())
            raise ExportCheckError(f"ONNX fp32 output differs from torch by more than {atol:g} ({shown})", errors)
        report = ExportReport(out, preprocessing_path(out), batch_sizes, errors, metadata=meta)
        if int8:
            quantize_int8(fp32, final)
            q_session = _session(final)
            q_out = [_run(q_session, x.numpy()) for x in inputs]
            ref, got = np.concatenate(fp32_out), np.concatenate(q_out)
            report.int8_max_abs_diff = float(np.abs(got - ref).max())
            report.int8_top1_agreement = float((got.argmax(1) == ref.argmax(1)).mean())
    atomic_write_json(report.preprocessing_path, meta)
    return report


def _check_arguments(model: ViT, out: Path, *, opset: int, batch_check: int, atol: float, exporter: Exporter) -> None:
    if exporter not in ("torchscript", "dynamo"):
        raise ExportError(f"exporter {exporter!r} is not one of ['torchscript', 'dynamo']")
    low, top = (MIN_OPSET if exporter == "torchscript" else 18), _max_opset(exporter)
    if not low <= opset <= top:
        raise ExportError(f"opset {opset} is not supported by the {exporter} exporter: use {low}..{top}")
    if batch_check < 2:
        raise ExportError(f"batch_check must be >= 2 (the check runs at batch 1 and at batch_check), got {batch_check}")
    if not atol > 0:
        raise ExportError(f"atol must be > 0, got {atol}")
    if exporter == "dynamo" and model.config.pos_embed == "relative":
        raise ExportError(
            "the dynamo exporter cannot export pos_embed='relative' (torch decomposes attention with a float "
            "mask into a view it cannot take): use the torchscript exporter"
        )
    _check_writable(out)


def _max_opset(exporter: Exporter) -> int:
    try:
        from torch.onnx import _constants

        name = "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET" if exporter == "torchscript" else "ONNX_MAX_OPSET"
        return int(getattr(_constants, name))
    except (ImportError, AttributeError):  # a torch that moved its constants: what torch 2.14 supports
        return 20 if exporter == "torchscript" else 23


def _check_writable(out: Path) -> None:
    """Fail before the (slow) export if ``out`` cannot be written."""
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory: give a file name such as {out / 'model.onnx'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=f".{out.name}.", suffix=".probe", dir=out.parent):
            pass
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from e


def _check_inputs(config: ViTConfig, batch_sizes: Sequence[int], seed: int) -> list[Tensor]:
    """Standard-normal inputs: the range of normalised pixels."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, config.in_channels, *config.image_size, generator=g) for b in batch_sizes]


def _torch_export(model: ViT, path: Path, *, opset: int, exporter: Exporter, output_name: str) -> None:
    c = model.config
    example = torch.randn(TRACE_BATCH, c.in_channels, *c.image_size)
    with warnings.catch_warnings():
        # the TorchScript exporter announces its deprecation, and the tracer warns about the Python-level
        # shape checks in ViT._check, which only look at C, H and W (fixed in the graph, as intended)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if exporter == "torchscript":
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[output_name],
                dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
            )
        else:
            try:
                import onnxscript  # noqa: F401
            except ImportError as e:
                raise MissingDependencyError("the dynamo exporter needs onnxscript: pip install onnxscript") from e
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                external_data=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[output_name],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )


def _set_metadata(path: Path, meta: dict[str, Any]) -> None:
    onnx, _ = require_onnx()
    proto = onnx.load(str(path))
    for prop in list(proto.metadata_props):
        if prop.key == METADATA_KEY:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """onnxruntime dynamic quantisation of ``src`` into ``dst`` (see the module docstring for why dynamic)."""
    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # reduce_range: weights in 7 bits. onnxruntime's uint8 x int8 kernels on x86 CPUs without VNNI (AVX2) add
    # pairs of products in 16 bits, which saturate with full-range 8-bit weights; the file may run on either kind
    # of CPU. On session 13's AVX2 CPU a tiny, barely fitted model agreed with fp32 on 55/64 images with 8-bit
    # weights and 61/64 with 7-bit; the demo model (805k parameters) 99.8% / 99.7% over 1,000 test images.
    with _quiet_ort_quantization():
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
        )
    return Path(dst)


class _DropPreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quiet_ort_quantization() -> Iterator[None]:
    """onnxruntime logs advice to run its shape-inference pre-pass to the root logger; it only matters for
    static quantisation, so drop that one message while quantising."""
    root = logging.getLogger()
    quiet = _DropPreprocessAdvice()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _session(path: str | Path, threads: int | None = None) -> onnxruntime.InferenceSession:
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _run(session: onnxruntime.InferenceSession, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = session.run(None, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]
    return out


# ------------------------------------------------------------------------------------------ inference
class OnnxClassifier:
    """An exported model run by onnxruntime, usable where a :class:`ViT` is used for inference.

    ``model(x)`` takes the preprocessed float tensor (B, C, H, W) and returns logits (B, num_classes) as a
    torch tensor; ``preprocessing``, ``class_names`` and ``config`` (the architecture, a :class:`ViTConfig`)
    are those of the exported checkpoint.
    """

    def __init__(self, session: onnxruntime.InferenceSession, metadata: dict[str, Any], path: Path) -> None:
        self.session = session
        self.metadata = metadata
        self.path = path
        try:
            self.config = ViTConfig.from_dict(metadata["architecture"])
            self.preprocessing = Preprocessing.from_dict(
                {
                    **{k: metadata[k] for k in ("image_size", "mean", "std", "interpolation", "crop_pct")},
                    "crop_mode": metadata.get("crop_mode", "center"),  # exports before crop_mode: center
                }
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{path}: invalid vitlab export metadata: {e}") from e
        names = metadata.get("class_names")
        self.class_names: list[str] | None = list(names) if names is not None else None
        self.quantization: str | None = metadata.get("quantization")
        self.input_name: str = session.get_inputs()[0].name

    training = False

    def eval(self) -> OnnxClassifier:
        """For code written for a :class:`ViT`; an ONNX model is always in inference mode."""
        return self

    def __call__(self, images: Tensor) -> Tensor:
        c = self.config
        expected = (c.in_channels, *c.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{self.path.name} takes images of shape (batch, {', '.join(map(str, expected))}), "
                f"got {tuple(images.shape)}"
            )
        x = images.detach().to("cpu", torch.float32).numpy()
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0]
        return torch.from_numpy(np.asarray(out))

    def __repr__(self) -> str:
        q = f", quantization={self.quantization!r}" if self.quantization else ""
        return f"OnnxClassifier({str(self.path)!r}, num_classes={self.config.num_classes}{q})"


def load_onnx(path: str | Path, *, threads: int | None = None) -> OnnxClassifier:
    """Open an ONNX file written by :func:`export`, with its preprocessing (from ``NAME.preprocessing.json``
    if present, else from the model's own metadata)."""
    require_onnx()
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no ONNX file at {path}")
    try:
        session = _session(path, threads)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidProtobuf, ...)
        raise ExportError(f"cannot load {path} with onnxruntime: {e}") from e
    sidecar = preprocessing_path(path)
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ExportError(f"{sidecar} is not valid JSON: {e}") from e
    else:
        text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if text is None:
            raise ExportError(
                f"{path} has no preprocessing: neither {sidecar.name} beside it nor vitlab metadata inside it "
                "(was it written by `vitlab export`?)"
            )
        meta = json.loads(text)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_TAG:
        raise ExportError(f'the metadata of {path} is not a vitlab export (no "format": "{FORMAT_TAG}")')
    return OnnxClassifier(session, meta, path)
