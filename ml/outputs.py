"""Write a cleaning job's results to a directory, atomically, file by file.

Every file is written to a hidden temporary name in the same directory and renamed
into place, so a reader never sees a half-written file. ``report.json`` is written last:
its presence means the job's outputs are complete.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noisescore.atomic import atomic_write, atomic_write_bytes
from noisescore.ml.clean import CleanResult

REPORT = "report.json"
TRUST_CSV = "trust.csv"
TRUST_BY_EPOCH = "trust_by_epoch.npy"
MODEL = "model.pt"


def trust_csv(result: CleanResult) -> bytes:
    """``index,sample_id,observed_label,trust,flagged,corrected_label[,true_label]``."""
    hook = result.linc.linc
    assert hook is not None
    truth = result.data.train_true
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["index", "sample_id", "observed_label", "trust", "flagged", "corrected_label"]
    writer.writerow([*header, "true_label"] if truth is not None else header)
    ids = result.data.dataset.train.sample_ids
    for i in range(len(hook.trust_)):
        row = [
            i,
            ids[i],
            int(hook.observed_labels_[i]),
            f"{hook.trust_[i]:.6f}",
            int(hook.flagged_[i]),
            int(hook.corrected_labels_[i]),
        ]
        writer.writerow([*row, int(truth[i])] if truth is not None else row)
    return buffer.getvalue().encode()


def model_checkpoint(result: CleanResult) -> dict[str, Any]:
    """Weights plus what is needed to rebuild the model and preprocess inputs."""
    dataset, run = result.data.dataset, result.linc
    return {
        "format": "noisescore.model.v1",
        "model": result.settings.model,
        "num_classes": dataset.n_classes,
        "in_chans": dataset.in_chans,
        "img_size": dataset.image_size[0],
        "mean": run.images.mean_list,
        "std": run.images.std_list,
        "state_dict": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
    }


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir`` as a Path; an existing non-directory there is an error."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} exists and is not a directory")
    return out


def write_outputs(result: CleanResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``trust.csv``, ``trust_by_epoch.npy``, ``model.pt`` and, last, ``report.json``."""
    out = check_out_dir(out_dir)
    hook = result.linc.linc
    assert hook is not None
    paths = {name: out / name for name in (TRUST_CSV, TRUST_BY_EPOCH, MODEL, REPORT)}
    atomic_write_bytes(paths[TRUST_CSV], trust_csv(result))
    atomic_write(paths[TRUST_BY_EPOCH], lambda f: np.save(f, hook.trust_by_epoch_))
    atomic_write(paths[MODEL], lambda f: torch.save(model_checkpoint(result), f))
    report = json.dumps(result.report, indent=2, sort_keys=False, allow_nan=False)
    atomic_write_bytes(paths[REPORT], report.encode() + b"\n")
    return paths
