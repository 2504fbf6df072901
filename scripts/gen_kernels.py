#!/usr/bin/env python3
"""Write (or check) the tiny ONNX graphs that sieve_core runs through onnxruntime as compute kernels.

python scripts/gen_kernels.py           # rewrite sieve_core/kernels/*.onnx
python scripts/gen_kernels.py --check   # exit 1 if a checked-in graph differs (tests run this)

matmul_u8s8.onnx: one MatMulInteger node, A uint8 (rows, dims) with a scalar zero point, B int8 (dims, q)
-> int32 (rows, q). MaxSim over int8/int4 token blobs (sieve_core/late_interaction.py) runs its products
through it: onnxruntime's u8s8 GEMM uses the CPU's integer dot-product instructions (VNNI here); MaxSim
runs 2.4x faster than with float32 products (bench/evidence_cost.py). The graphs are checked in so that serving needs only onnxruntime;
writing them needs the `onnx` package (the `export` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "sieve_core" / "kernels"


def matmul_u8s8() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B", "a_zero_point"], ["Y"])],
        "matmul_u8s8",
        [
            helper.make_tensor_value_info("A", TensorProto.UINT8, ["rows", "dims"]),
            helper.make_tensor_value_info("B", TensorProto.INT8, ["dims", "q"]),
            helper.make_tensor_value_info("a_zero_point", TensorProto.UINT8, []),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, ["rows", "q"])],
    )
    model = helper.make_model(graph, producer_name="sieve", opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what onnxruntime 1.x reads (the onnx package may default to a newer one)
    return bytes(model.SerializeToString(deterministic=True))


GRAPHS = {"matmul_u8s8.onnx": matmul_u8s8}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    stale = []
    for name, build in GRAPHS.items():
        path, data = KERNELS / name, build()
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(name)
        else:
            path.write_bytes(data)
            print(f"wrote {path} ({len(data)} bytes)")
    if stale:
        print(f"stale kernels (run scripts/gen_kernels.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
