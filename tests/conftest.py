from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each available device in turn: the CPU always, CUDA when present."""
    return torch.device(request.param)


@pytest.fixture
def shared_data() -> Path:
    """The team's reference data folder (../shared/data); skips when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def formats_dir(shared_data) -> Path:
    """``../shared/data/formats`` (real RELION and cryoSPARC files); skips when absent."""
    d = shared_data / "formats"
    if not d.is_dir():
        pytest.skip(f"{d} absent")
    return d
