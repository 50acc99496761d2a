"""The committed stubs in noisescore/v1 are what `make proto` generates from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = "proto/noisescore/v1/noise_scoring.proto"
FILES = ("noise_scoring_pb2.py", "noise_scoring_pb2.pyi", "noise_scoring_pb2_grpc.py")


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
        f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
        str(ROOT / PROTO),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    for name in FILES:
        generated = (tmp_path / "noisescore" / "v1" / name).read_text()
        committed = (ROOT / "noisescore" / "v1" / name).read_text()
        assert generated == committed, f"noisescore/v1/{name} is stale: run `make proto`"


def test_api_shape() -> None:
    from noisescore.v1 import noise_scoring_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["NoiseScoring"]
    assert pb.DESCRIPTOR.package == "noisescore.v1"
    assert {m.name for m in service.methods} == {
        "SubmitCleaningJob", "GetJob", "ListJobs", "CancelJob", "WatchJob",
        "GetCorrections", "StreamCorrections", "ScoreLabels", "Predict",
        "SubmitActiveCleaningJob", "GetRelabelQueue", "SubmitRelabels",
    }  # fmt: skip
    streams = {m.name for m in service.methods if m.server_streaming}
    assert streams == {"WatchJob", "StreamCorrections"}
    assert [v.name for v in pb.Job.State.DESCRIPTOR.values] == [
        "STATE_UNSPECIFIED", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED",
        "WAITING_FOR_LABELS",
    ]  # fmt: skip
