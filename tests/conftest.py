from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real MedMNIST files (../shared/data), as in CI."""
    if not (SHARED_DATA / "breastmnist.npz").is_file():
        pytest.skip(f"real MedMNIST data not found in {SHARED_DATA}")
    return SHARED_DATA
