"""Running exported models with onnxruntime: the part of the ONNX contract the service needs.

:mod:`noisescore.ml.export` writes models (it needs torch and onnx); this module only
loads and runs them, so the gRPC service image carries onnxruntime and numpy, not torch.
The contract (input :data:`INPUT_NAME`, outputs :data:`OUTPUT_NAMES`, the
``noisescore.format`` metadata :data:`ONNX_FORMAT`) is described in
:mod:`noisescore.ml.export`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

try:
    import onnxruntime as ort
except ModuleNotFoundError as err:  # pragma: no cover - depends on the install
    raise ModuleNotFoundError(
        "onnxruntime is not installed: install noisescore with the 'cpu' extra "
        "(pip install 'noisescore[cpu]') or, on a CUDA machine, the 'gpu' extra"
    ) from err

if TYPE_CHECKING:
    import onnx

ONNX_FORMAT = "noisescore.onnx.v1"
INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "logits")


def onnx_providers() -> list[str]:
    """Execution providers to run exported models with, best first.

    Returns
    -------
    list of str
        ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` when onnxruntime has the
        CUDA provider (``onnxruntime-gpu``), else ``["CPUExecutionProvider"]``.
    """
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_session(
    onnx_bytes: bytes,
    *,
    providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
    intra_op_threads: int = 0,
) -> ort.InferenceSession:
    """An onnxruntime session for exported bytes.

    Parameters
    ----------
    onnx_bytes : bytes
        A model from :func:`export_onnx`.
    providers : sequence, optional, keyword-only
        onnxruntime providers, names or ``(name, options)`` pairs; default
        :func:`onnx_providers`. A plain ``"CUDAExecutionProvider"`` runs with TF32 off
        (``use_tf32=0``) so GPU results stay within :data:`PARITY_TOLERANCE` of float32
        torch; pass ``("CUDAExecutionProvider", {...})`` to choose otherwise.
    intra_op_threads : int, keyword-only
        Threads of one run on the CPU; 0 = onnxruntime's default (one per core).

    Returns
    -------
    onnxruntime.InferenceSession
    """
    chosen = list(onnx_providers() if providers is None else providers)
    resolved = [
        ("CUDAExecutionProvider", {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p
        for p in chosen
    ]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: keep CLI output clean
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, sess_options=options, providers=resolved)


def read_metadata(
    session_or_bytes: ort.InferenceSession | bytes | onnx.ModelProto,
) -> dict[str, str]:
    """The ``metadata_props`` of an exported model.

    Parameters
    ----------
    session_or_bytes : onnxruntime.InferenceSession, bytes or onnx.ModelProto
        A loaded session, the serialized model, or the parsed proto.

    Returns
    -------
    dict of str to str
        ``noisescore.format``, ``model``, ``num_classes``, ``in_chans``, ``img_size``,
        ``mean``, ``std`` (JSON lists) and the caller's extra metadata.
    """
    if isinstance(session_or_bytes, ort.InferenceSession):
        return dict(session_or_bytes.get_modelmeta().custom_metadata_map)
    if isinstance(session_or_bytes, bytes | bytearray | memoryview):
        session = ort.InferenceSession(bytes(session_or_bytes), providers=["CPUExecutionProvider"])
        return dict(session.get_modelmeta().custom_metadata_map)
    if importlib.util.find_spec("onnx") is not None:  # installed with the training runtime
        import onnx

        if isinstance(session_or_bytes, onnx.ModelProto):
            return {p.key: p.value for p in session_or_bytes.metadata_props}
    raise TypeError(
        "read_metadata takes an onnxruntime.InferenceSession, bytes or onnx.ModelProto; "
        f"got {type(session_or_bytes).__name__}"
    )
