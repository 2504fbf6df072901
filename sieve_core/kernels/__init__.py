"""Integer matrix products through onnxruntime, for MaxSim over int8 and int4 token blobs.

`matmul_u8s8(a, b, zero)`: (a - zero) @ b exactly, in int32, for a uint8 (rows, dims) and b int8 (dims, q),
through the one-node graph matmul_u8s8.onnx (written by scripts/gen_kernels.py). onnxruntime's u8s8 GEMM
(MLAS) uses the CPU's integer dot-product instructions where it has them (AVX512-VNNI / AVX-VNNI): MaxSim
over 100 SciFact documents (int4 pool 2) took 2.45 ms this way against 5.86 ms with float32 products, one
thread (bench/evidence_cost.py).

Without VNNI, x86 u8s8 kernels may add pairs of products in saturating 16-bit arithmetic, which is not exact
for full-range uint8 codes. So the first use checks the kernel on extreme values (255 x +-127 throughout)
against numpy's exact product; a kernel that is not exact is not used (`available()` is False) and
MaxSim falls back to its float32 path, which gives the same ranking at the float path's speed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

GRAPH = Path(__file__).resolve().parent / "matmul_u8s8.onnx"
_lock = threading.Lock()
_session: object | None = None
_checked = False


def _create() -> object | None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as MaxSim's one BLAS thread: parallel across requests instead
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(GRAPH), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    dims, q = 384, 16
    a = np.full((64, dims), 255, dtype=np.uint8)
    a[32:] = rng.integers(0, 256, (32, dims), dtype=np.uint8)
    b = np.where(rng.random((dims, q)) < 0.5, -127, 127).astype(np.int8)
    b[:, 0] = 127
    for zero in (0, 128):
        got = session.run(None, {"A": a, "B": b, "a_zero_point": np.array(zero, dtype=np.uint8)})[0]
        exact = (a.astype(np.int64) - zero) @ b.astype(np.int64)
        if not np.array_equal(got, exact):
            log.warning(
                "onnxruntime's u8s8 matrix product is not exact on this CPU (no VNNI?): MaxSim over "
                "integer token blobs uses float32 products instead"
            )
            return None
    log.info("MaxSim over int8/int4 token blobs: exact integer products (onnxruntime u8s8)")
    return session


def available() -> bool:
    """Whether the exact integer product runs here (checked once per process)."""
    global _session, _checked
    if not _checked:
        with _lock:
            if not _checked:
                _session = _create()
                _checked = True
    return _session is not None


def matmul_u8s8(a: np.ndarray, b: np.ndarray, zero: int) -> np.ndarray:
    """(a - zero) @ b as int32: a uint8 (rows, dims) C-contiguous, b int8 (dims, q). Needs `available()`."""
    if not available():
        raise RuntimeError("the integer matrix product is not available on this machine")
    assert _session is not None
    run = _session.run  # type: ignore[attr-defined]
    out: np.ndarray = run(None, {"A": a, "B": b, "a_zero_point": np.array(zero, dtype=np.uint8)})[0]
    return out
