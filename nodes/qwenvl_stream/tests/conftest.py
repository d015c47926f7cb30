"""Fixtures: a tiny random Qwen2.5-VL built once per session, loaded by the node's own code."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

# No hub, ever: the tiny model is built locally and loaded from its directory.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:  # for tests.dataflow (the e2e harness) when only this folder is collected
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwenvl_tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


@pytest.fixture(scope="session")
def loaded_model(tiny_model_dir: Path) -> Any:
    from qwenvl_stream.model import load_model
    from qwenvl_stream.settings import Settings

    return load_model(Settings.from_env({"MODEL_NAME_OR_PATH": str(tiny_model_dir)}))
