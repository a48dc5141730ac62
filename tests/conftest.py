import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("GGTORCH_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
TINY = FIXTURES / "tiny"
GOLDENS = FIXTURES / "goldens"

# the repack cache (ggtorch.quant.cache) of every load in this test session, CLI subprocesses included,
# goes to a temporary directory: tests never read or write the user's ~/.cache/ggtorch/repack
_REPACK = tempfile.mkdtemp(prefix="ggtorch-test-repack-")
os.environ["GGTORCH_REPACK_CACHE"] = _REPACK
atexit.register(shutil.rmtree, _REPACK, True)


def tiny_manifest() -> dict:
    return json.loads((TINY / "manifest.json").read_text())


def tiny_files() -> list[Path]:
    return sorted(TINY.glob("*.gguf"))


@pytest.fixture(scope="session")
def smollm():
    import ggtorch

    return ggtorch.load("smollm2-135m")


@pytest.fixture(scope="session")
def gemma():
    import ggtorch

    return ggtorch.load("gemma3-270m")


@pytest.fixture(scope="session")
def smollm_exact():
    import ggtorch

    return ggtorch.load("smollm2-135m", fast=False)


@pytest.fixture(scope="session")
def gemma_exact():
    import ggtorch

    return ggtorch.load("gemma3-270m", fast=False)


def golden(name: str) -> dict:
    return json.loads((GOLDENS / f"{name}.json").read_text())
