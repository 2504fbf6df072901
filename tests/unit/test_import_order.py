"""Guard against a native-library clash: usearch loaded before onnxruntime segfaults the process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(
    "code",
    [
        "import server.storage.index; import onnxruntime",
        "import server.core.engine",
        "import server.app",
        "from server.storage.index import VectorIndex; from sieve_core.models.bi_encoder import BiEncoderRunner",
    ],
)
def test_modules_import_in_a_fresh_process(code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code + "; print('ok')"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", (
        result.returncode,
        result.stderr[-2000:],
    )
