"""The bytes of a cleaning job's artifacts, built from the stages' results.

Where they are written (a local directory or MinIO/S3, atomically, with a manifest) is
the artifact store's business (:mod:`noisescore.jobs`); here is only what they contain.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import numpy as np
import torch
from torch import nn

from noisescore.ml.clean import LincResult, PreparedData

MODEL_FORMAT = "noisescore.model.v1"


def trust_csv(data: PreparedData, linc: LincResult) -> bytes:
    """``index,sample_id,observed_label,trust,flagged,corrected_label[,true_label]``, then
    one column per detector score, ``consensus`` and the detectors' secondary values
    (e.g. ``aum,...,small_loss,consensus,datamaps_variability``; low score = suspect).

    The first columns keep their names and order from before the detectors, so readers
    of older files (the service's ``GetCorrections``) read both.
    """
    truth = data.train_true
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["index", "sample_id", "observed_label", "trust", "flagged", "corrected_label"]
    if truth is not None:
        header.append("true_label")
    columns = {**linc.scores, **linc.extras}
    columns.pop("linc", None)  # the trust column already is LiNC's alpha
    writer.writerow([*header, *columns])
    ids = data.dataset.train.sample_ids
    values = list(columns.values())
    for i in range(len(linc.trust)):
        row = [
            i,
            ids[i],
            int(linc.observed_labels[i]),
            f"{linc.trust[i]:.6f}",
            int(linc.flagged[i]),
            int(linc.corrected_labels[i]),
        ]
        if truth is not None:
            row.append(int(truth[i]))
        writer.writerow([*row, *(f"{v[i]:.6g}" for v in values)])
    return buffer.getvalue().encode()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def json_bytes(value: Any) -> bytes:
    """Pretty JSON; NaN/inf are refused so every reader can parse it."""
    return json.dumps(value, indent=2, allow_nan=False).encode() + b"\n"


def model_checkpoint(
    model: nn.Module,
    *,
    model_name: str,
    num_classes: int,
    in_chans: int,
    img_size: int,
    mean: list[float],
    std: list[float],
) -> bytes:
    """Weights plus what is needed to rebuild the model and preprocess inputs (``model.pt``)."""
    buffer = io.BytesIO()
    torch.save(
        {
            "format": MODEL_FORMAT,
            "model": model_name,
            "num_classes": num_classes,
            "in_chans": in_chans,
            "img_size": img_size,
            "mean": list(mean),
            "std": list(std),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        buffer,
    )
    return buffer.getvalue()
