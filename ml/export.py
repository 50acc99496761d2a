"""Self-contained ONNX export of a classifier, and a parity check against torch.

The exported graph is what the gRPC service loads with onnxruntime to serve ``Predict``
and score labels, so it carries everything a caller needs and nothing it must know:

- input ``images``: float32 ``(N, C, H, W)`` raw pixel intensities in ``[0, 255]``
  (uint8 images cast to float), with a dynamic batch dimension ``N``;
- outputs ``probabilities`` (softmax) and ``logits``, both float32 ``(N, K)``;
- the train-set normalisation (``x / 255``, then ``(x - mean) / std`` per channel) lives
  inside the graph (:class:`ProbabilityModel`), so no client can get it wrong;
- ``metadata_props`` name the format (:data:`ONNX_FORMAT`), the timm model, the shapes
  and the normalisation, plus any string metadata the caller adds (run id, dataset...).

All weights are embedded in the returned bytes (no external data files). A model is
only worth publishing if onnxruntime reproduces torch on real images:
:func:`export_with_parity` exports and compares probabilities on a test batch, and
raises :class:`ExportError` when they differ by more than :data:`PARITY_TOLERANCE`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from noisescore.ml.onnx_runtime import (
    INPUT_NAME,
    ONNX_FORMAT,
    OUTPUT_NAMES,
    load_session,
    onnx_providers,
    read_metadata,
)

__all__ = [
    "INPUT_NAME",
    "ONNX_FORMAT",
    "OUTPUT_NAMES",
    "PARITY_TOLERANCE",
    "ExportError",
    "ParityReport",
    "ProbabilityModel",
    "check_parity",
    "export_onnx",
    "export_with_parity",
    "load_session",
    "onnx_providers",
    "read_metadata",
]

PARITY_TOLERANCE = 1e-4
# Keys export_onnx writes itself; caller metadata may not shadow them.
RESERVED_METADATA = (
    "noisescore.format",
    "model",
    "num_classes",
    "in_chans",
    "img_size",
    "mean",
    "std",
)


class ExportError(RuntimeError):
    """The model could not be exported, or onnxruntime does not reproduce torch."""


class ProbabilityModel(nn.Module):
    """Raw pixels in, ``(probabilities, logits)`` out: the graph the service runs.

    Puts itself, and so the wrapped model, in eval mode (BatchNorm running statistics,
    no dropout). Wrap a copy when the caller's model must stay in training mode.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier mapping normalised ``(N, C, H, W)`` float images to ``(N, K)`` logits.
    mean, std : sequence of float, keyword-only
        Per-channel statistics of the training images scaled to ``[0, 1]``, length ``C``
        (what :class:`noisescore.ml.train.DeviceImages` normalises with).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, *, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_list, std_list = _stats(mean, std)
        self.model = model
        shape = (1, len(mean_list), 1, 1)
        self.register_buffer("mean", torch.tensor(mean_list, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std_list, dtype=torch.float32).view(shape))
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise raw ``[0, 255]`` float32 ``(N, C, H, W)`` images and classify them.

        Returns
        -------
        probabilities, logits : torch.Tensor
            float32 ``(N, K)``; each row of ``probabilities`` sums to 1.
        """
        x = (images / 255.0 - self.mean) / self.std
        logits = self.model(x).float()
        return torch.softmax(logits, dim=1), logits


def _stats(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    mean_list, std_list = [float(m) for m in mean], [float(s) for s in std]
    if not mean_list or len(mean_list) != len(std_list):
        raise ValueError(
            f"mean and std need one value per channel, got {len(mean_list)} and {len(std_list)}"
        )
    if not all(math.isfinite(m) for m in mean_list) or not all(
        math.isfinite(s) and s > 0 for s in std_list
    ):
        raise ValueError(f"mean must be finite and std finite and > 0; got {mean_list}, {std_list}")
    return mean_list, std_list


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A float32, contiguous-format CPU copy in eval mode; the caller's model is untouched."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    twin = copy.deepcopy(model)
    twin = twin.to(device="cpu", dtype=torch.float32)
    return twin.to(memory_format=torch.contiguous_format).eval()


def export_onnx(
    model: nn.Module,
    *,
    model_name: str,
    num_classes: int,
    in_chans: int,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    metadata: Mapping[str, str] | None = None,
    opset: int = 18,
) -> bytes:
    """Export ``model`` wrapped in :class:`ProbabilityModel` to self-contained ONNX bytes.

    The export runs on a float32 CPU copy in eval mode (torch's dynamo exporter), so the
    caller's model keeps its device, memory format, training mode and parameters.

    Parameters
    ----------
    model : torch.nn.Module
        A trained classifier taking normalised ``(N, in_chans, img_size, img_size)`` images.
    model_name : str, keyword-only
        Its timm name (``noisescore_cnn``, ``resnet18``...), recorded in the metadata.
    num_classes : int, keyword-only
        ``K``, the width of both outputs.
    in_chans : int, keyword-only
        Image channels ``C``.
    img_size : int, keyword-only
        Square image side ``H = W`` in pixels.
    mean, std : sequence of float, keyword-only
        Per-channel normalisation statistics (images scaled to ``[0, 1]``), length ``C``.
    metadata : mapping of str to str, optional, keyword-only
        Extra ``metadata_props`` (e.g. run id, dataset, git commit). May not reuse the
        keys written here: ``noisescore.format``, ``model``, ``num_classes``,
        ``in_chans``, ``img_size``, ``mean``, ``std``.
    opset : int, keyword-only
        ONNX opset of the default domain.

    Returns
    -------
    bytes
        A serialized ``onnx.ModelProto`` with input ``images`` float32 ``(N, C, H, W)``
        in ``[0, 255]`` (``N`` dynamic) and outputs ``probabilities`` and ``logits``,
        float32 ``(N, K)``; all weights embedded.

    Raises
    ------
    ValueError
        Inconsistent arguments (statistics length, reserved or non-string metadata).
    ExportError
        The exporter failed, or the graph does not have the expected signature.
    """
    mean_list, std_list = _stats(mean, std)
    if len(mean_list) != in_chans:
        raise ValueError(f"mean/std have {len(mean_list)} values but in_chans={in_chans}")
    if num_classes < 1 or in_chans < 1 or img_size < 1:
        raise ValueError(
            f"num_classes, in_chans and img_size must be >= 1; "
            f"got {num_classes}, {in_chans}, {img_size}"
        )
    extra = dict(metadata or {})
    clash = sorted(set(extra) & set(RESERVED_METADATA))
    if clash:
        raise ValueError(f"metadata keys {clash} are written by export_onnx; rename them")
    bad = sorted(k for k, v in extra.items() if not (isinstance(k, str) and isinstance(v, str)))
    if bad:
        raise ValueError(f"metadata keys and values must be str; convert {bad} (json.dumps)")

    wrapper = ProbabilityModel(_cpu_copy(model), mean=mean_list, std=std_list)
    # Batch 2 as the example: torch.export specialises sizes 0 and 1.
    example = torch.rand(2, in_chans, img_size, img_size) * 255.0
    batch = torch.export.Dim("batch")
    log = io.StringIO()
    try:
        # verbose=False keeps the "[torch.onnx] ..." progress lines off stdout; the
        # redirect catches whatever a fallback capture strategy still prints.
        with contextlib.redirect_stdout(log), torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
    except Exception as err:
        tail = log.getvalue()[-2000:]
        raise ExportError(
            f"torch.onnx.export failed for {model_name!r}: {err}" + (f"\n{tail}" if tail else "")
        ) from err
    if program is None:  # only when f is given; kept for the type checker
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto

    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
        raise ExportError(f"exported graph has inputs {inputs} and outputs {outputs}")
    props = {
        "noisescore.format": ONNX_FORMAT,
        "model": model_name,
        "num_classes": str(num_classes),
        "in_chans": str(in_chans),
        "img_size": str(img_size),
        "mean": json.dumps(mean_list),
        "std": json.dumps(std_list),
        **extra,
    }
    onnx.helper.set_model_props(proto, props)
    data = proto.SerializeToString()
    try:
        onnx.checker.check_model(data)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"exported ONNX model for {model_name!r} is invalid: {err}") from err
    return data


@dataclass(frozen=True)
class ParityReport:
    """How closely onnxruntime reproduced torch's probabilities on one batch.

    Attributes
    ----------
    max_abs_diff : float
        Largest ``|p_onnx - p_torch|`` over the ``(N, K)`` probabilities (NaN fails).
    batch_size : int
        ``N``, the images compared.
    tolerance : float
        The threshold ``max_abs_diff`` had to stay under (inclusive).
    passed : bool
        ``max_abs_diff <= tolerance``.
    provider : str
        The onnxruntime execution provider that ran the graph.
    """

    max_abs_diff: float
    batch_size: int
    tolerance: float
    passed: bool
    provider: str

    def as_dict(self) -> dict[str, Any]:
        """Plain ``dict`` for JSON reports and artifact metadata."""
        return asdict(self)


def check_parity(
    onnx_bytes: bytes,
    model: nn.Module,
    images: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    tolerance: float = PARITY_TOLERANCE,
    providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
) -> ParityReport:
    """Compare onnxruntime's probabilities with torch's on one batch of real images.

    The reference is :class:`ProbabilityModel` around a float32 CPU copy of ``model``
    in eval mode, without autocast; ``model`` itself is not modified.

    Parameters
    ----------
    onnx_bytes : bytes
        A model from :func:`export_onnx`.
    model : torch.nn.Module
        The torch model it was exported from (any device, any mode).
    images : numpy.ndarray
        uint8 ``(N, C, H, W)`` test images, ``N >= 1``.
    mean, std : sequence of float, keyword-only
        The normalisation the torch reference uses, length ``C``.
    tolerance : float, keyword-only
        Largest acceptable absolute difference of any probability.
    providers : sequence, optional, keyword-only
        onnxruntime providers, as for :func:`load_session`.

    Returns
    -------
    ParityReport
    """
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[0] < 1:
        raise ValueError(
            f"images must be uint8 of shape (N, C, H, W) with N >= 1, "
            f"got {images.dtype} {images.shape}"
        )
    session = load_session(onnx_bytes, providers=providers)
    meta = read_metadata(session)
    if "in_chans" in meta and "img_size" in meta:
        side = int(meta["img_size"])
        expected = (int(meta["in_chans"]), side, side)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"images are {images.shape[1:]} but the model takes {expected}")
    pixels = np.ascontiguousarray(images, dtype=np.float32)
    onnx_probs = session.run([OUTPUT_NAMES[0]], {INPUT_NAME: pixels})[0]

    reference = ProbabilityModel(_cpu_copy(model), mean=mean, std=std)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        torch_probs = reference(torch.from_numpy(pixels))[0].numpy()

    diff = float(np.max(np.abs(onnx_probs.astype(np.float64) - torch_probs)))
    return ParityReport(
        max_abs_diff=diff,
        batch_size=int(images.shape[0]),
        tolerance=float(tolerance),
        passed=bool(diff <= tolerance),  # NaN compares False
        provider=session.get_providers()[0],
    )


def export_with_parity(
    model: nn.Module,
    *,
    model_name: str,
    num_classes: int,
    in_chans: int,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    images: np.ndarray,
    metadata: Mapping[str, str] | None = None,
    opset: int = 18,
    tolerance: float = PARITY_TOLERANCE,
    providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
) -> tuple[bytes, ParityReport]:
    """:func:`export_onnx`, then :func:`check_parity` on ``images``; fail loudly on a mismatch.

    Parameters
    ----------
    model, model_name, num_classes, in_chans, img_size, mean, std, metadata, opset
        As for :func:`export_onnx`.
    images : numpy.ndarray, keyword-only
        uint8 ``(N, C, H, W)`` test batch for the parity check.
    tolerance : float, keyword-only
        Largest acceptable absolute probability difference.
    providers : sequence, optional, keyword-only
        onnxruntime providers for the check, as for :func:`load_session`.

    Returns
    -------
    onnx_bytes : bytes
        The exported model.
    report : ParityReport
        The passing parity check.

    Raises
    ------
    ExportError
        Export failed, or onnxruntime's probabilities differ from torch's by more than
        ``tolerance``.
    """
    data = export_onnx(
        model,
        model_name=model_name,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        mean=mean,
        std=std,
        metadata=metadata,
        opset=opset,
    )
    report = check_parity(
        data, model, images, mean=mean, std=std, tolerance=tolerance, providers=providers
    )
    if not report.passed:
        raise ExportError(
            f"ONNX export of {model_name!r} does not reproduce torch: max |p_onnx - p_torch| = "
            f"{report.max_abs_diff:.3g} > tolerance {tolerance:.3g} on {report.batch_size} "
            f"images ({report.provider})"
        )
    return data, report
