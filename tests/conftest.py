import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

LAB = ROOT / "experiments" / "training_loop_lab.yaml"


@pytest.fixture
def lab_path() -> Path:
    return LAB
