"""Shared test setup: offline, quiet, and tiny."""

import os
from pathlib import Path

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: 2 threads on a shared 2-core box are ~100x slower

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "skeleton" / "fixtures"  # package data: experiment=tiny reads them too
SHARED_DATA = Path(os.environ.get("SKELETON_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "glue").exists():
        pytest.skip(f"shared GLUE data not found at {SHARED_DATA}")
    return SHARED_DATA
