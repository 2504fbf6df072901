"""Late-interaction peers: the project's warm ColBERT stage vs colbert-ai (and PyLate) on the same checkpoint.

    .venv/bin/python bench/late_interaction_peers.py BEIR_DIR [--quick] [--queries N] [--candidates 100]
        [--threads T]

Checkpoint: no trained ColBERT weights are reachable here, so all sides load the seeded colbert-ir
checkpoint of `python -m sieve_core.models.export_colbert seed` (all-MiniLM-L6-v2 + a seeded 384->128
projection, [Q]/[D] markers), and the project serves its export (`python -m sieve_core.models.export
colbert`); both are built once into bench/.cache (the same folders bench/rerank.py uses). The scores carry
no ranking quality; this measures speed and agreement of implementations of the same model.

Candidates: for N test queries (fixed seed), their bi-encoder top 100 from the service section's retrieve
run (bench/.cache/candidates-<name>.json; the first 100 corpus documents if it is missing). Every side
encodes the union of the candidates once, untimed per query (the document side is precomputed: that is
the point of late interaction), and reports its document encoding rate. Then, per query, alternating
the order of the sides, the timed span is everything a warm re-rank does from the query text:

  sieve (store)   what the server does for a ColBERT collection (server/core/tokens.py): query encoding
                  (ONNX; in the server a colbert worker's sieve.query_tokens, here in-process, no round
                  trip), the 100 candidates' int8 blobs (unpooled: pool_factor 1, the rows the peers
                  score) read by key from a store of the server's kind (server/storage/store.py, a
                  temporary SQLite file), prepare_query + maxsim_blobs; `sieve_store_pool4`: the same with
                  the default format (int8, pool 4: about a quarter of the rows; timed, not in agreement)
  sieve (memory)  query encoding + MaxSim over the unpooled int8 blobs held in memory
  colbert-ai      colbert-ai 0.2.22 in its own process: Checkpoint.queryFromText + colbert_score over the
                  candidates' precomputed padded float32 token matrices and their mask
  pylate          PyLate in its own process (only when SIEVE_PYLATE_PYTHON names a Python that has it, see
                  tests/integration/test_colbert.py): ColBERT.encode(is_query=True) + rank.rerank over its precomputed
                  document embeddings

Peers are timed inside their processes (no IPC in their figures); torch threads = ONNX threads = T, and the
in-memory variants once more at 1 thread (`_1t`): on a busy machine torch's thread pool, called back to
back, degrades far more than onnxruntime's, and 1 thread is then its best case.
Agreement: Spearman of each peer's scores against sieve's per query, and the top-10 overlap.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

COLBERT_NAME = "colbert-seeded-minilm"  # built by run.build_seeded, in bench/rerank.py's layout
BATCH = 32


# -- the peer processes (torch lives only there) -----------------------------------------------------------


def _load_colbert_ai(checkpoint: Path) -> Any:
    # tests/reference/colbert_embed.py holds the one transformers-5 workaround colbert-ai 0.2.22 needs and
    # the check that the weights were loaded as stored; use it rather than a copy.
    path = Path(__file__).resolve().parent.parent / "tests" / "reference" / "colbert_embed.py"
    spec = importlib.util.spec_from_file_location("colbert_embed", path)
    assert spec is not None and spec.loader is not None
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    reference._let_colbert_ai_load_on_transformers_5()
    from colbert.modeling.colbert import ColBERT

    ColBERT.loaded_extensions = True  # only colbert_score_packed needs the C++ extension
    from colbert.infra import ColBERTConfig
    from colbert.modeling.checkpoint import Checkpoint

    model = Checkpoint(str(checkpoint), colbert_config=ColBERTConfig(), verbose=0)
    reference._check_loaded_weights(checkpoint, model.model.state_dict())
    return model


def serve(library: str, checkpoint: Path, threads: int) -> int:
    """One JSON request per stdin line, one JSON answer per stdout line."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import importlib.metadata

    import torch

    torch.set_num_threads(threads)
    state: dict[str, Any] = {}
    if library == "colbert-ai":
        from colbert.modeling.colbert import colbert_score

        model = _load_colbert_ai(checkpoint)
        version = importlib.metadata.version("colbert-ai")

        def encode_documents(texts: list[str]) -> None:
            ids, mask = model.doc_tokenizer.tensorize(texts)  # padded to the longest: one width for all
            parts, masks = [], []
            for start in range(0, len(texts), BATCH):
                d, m = model.doc(
                    ids[start : start + BATCH], mask[start : start + BATCH], keep_dims="return_mask"
                )
                parts.append(d.float())
                masks.append(m)
            state["D"], state["mask"] = torch.cat(parts), torch.cat(masks)

        def score(query: str, indices: list[int]) -> list[float]:
            q = model.queryFromText([query], to_cpu=True).float()
            index = torch.tensor(indices)
            d, m = state["D"].index_select(0, index), state["mask"].index_select(0, index)
            return colbert_score(q, d, m, config=model.colbert_config).tolist()  # type: ignore[no-any-return]

    else:
        from pylate import models, rank

        model = models.ColBERT(model_name_or_path=str(checkpoint), device="cpu", local_files_only=True)
        version = importlib.metadata.version("pylate")

        def encode_documents(texts: list[str]) -> None:
            state["D"] = model.encode(texts, batch_size=BATCH, is_query=False, show_progress_bar=False)

        def score(query: str, indices: list[int]) -> list[float]:
            q = model.encode([query], batch_size=1, is_query=True, show_progress_bar=False)
            ranked = rank.rerank(
                documents_ids=[indices],
                queries_embeddings=q,
                documents_embeddings=[[state["D"][i] for i in indices]],
            )[0]
            by_id = {r["id"]: r["score"] for r in ranked}
            return [float(by_id[i]) for i in indices]

    print(
        json.dumps({"ready": True, "library": f"{library} {version}", "torch": torch.__version__}), flush=True
    )
    with torch.inference_mode():
        for line in sys.stdin:
            request = json.loads(line)
            torch.set_num_threads(request.get("threads", threads))
            t = time.perf_counter()
            if "documents" in request:
                encode_documents(request["documents"])
                print(json.dumps({"seconds": time.perf_counter() - t}), flush=True)
            else:
                scores = score(request["query"], request["indices"])
                print(json.dumps({"seconds": time.perf_counter() - t, "scores": scores}), flush=True)
    return 0


class Peer:
    def __init__(self, python: str, library: str, checkpoint: Path, threads: int) -> None:
        argv = [
            python,
            __file__,
            "--serve",
            library,
            "--checkpoint",
            str(checkpoint),
            "--threads",
            str(threads),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer process exited ({self.proc.wait()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- this process ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def token_store(
    blobs: dict[str, dict[str, bytes]], formats: dict[str, Any]
) -> Iterator[tuple[Any, dict[str, int], dict[str, dict[str, int]]]]:
    """A throw-away store of the server's kind (server/storage/store.py: SQLite, WAL, synchronous=FULL),
    one collection per stored format, each document's blob in its `tokens` table, written with the
    document as UpsertDocuments writes it. Yields the store, each collection's id and document keys."""
    from server.storage.store import SqliteStore
    from sieve_core.types import Document

    with tempfile.TemporaryDirectory(prefix="sieve-bench-li-") as tmp:
        store = SqliteStore(Path(tmp) / "sieve.db")
        try:
            ids: dict[str, int] = {}
            keys: dict[str, dict[str, int]] = {}
            vector = np.zeros(4, dtype=np.float32)
            for name, by_doc in blobs.items():
                fmt = json.dumps(formats[name].to_json())
                cid = store.create_collection(
                    name, COLBERT_NAME, COLBERT_NAME, "cosine", 4, "{}", fmt, "m"
                ).id
                docs = [Document(d, "") for d in by_doc]
                for at in range(0, len(docs), 500):
                    chunk = docs[at : at + 500]
                    store.upsert(
                        cid, chunk, {d.id: vector for d in chunk}, {d.id: by_doc[d.id] for d in chunk}
                    )
                stored = store.documents_by_keys(cid, range(1, len(docs) + 1), with_text=False).values()
                ids[name], keys[name] = cid, {d.doc_id: d.key for d in stored}
            yield store, ids, keys
        finally:
            store.close()


def spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def top_overlap(a: list[float], b: list[float], k: int = 10) -> int:
    return len(set(np.argsort(a)[::-1][:k].tolist()) & set(np.argsort(b)[::-1][:k].tolist()))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("beir", type=Path, nargs="?")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--queries", type=int, help="test queries (default 20, quick 2)")
    parser.add_argument("--candidates", type=int, help="candidates per query (default 100, quick 50)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX and torch threads (0: all cores)")
    parser.add_argument("--serve", choices=("colbert-ai", "pylate"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.checkpoint, args.threads or 1)

    from run import CACHE, available_cores, build_seeded, command_line, log, percentiles, write_result

    from sieve_core.beir import load_beir
    from sieve_core.late_interaction import maxsim_blobs
    from sieve_core.models.colbert import ColbertRunner
    from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, TokenFormat, compress_many, prepare_query

    if args.beir is None or not (args.beir / "corpus.jsonl").is_file():
        print(f"skipped: {args.beir} is not a BEIR folder", file=sys.stderr)
        return 0
    started = time.monotonic()
    threads = args.threads or available_cores()
    n_queries = args.queries or (2 if args.quick else 20)
    n_candidates = args.candidates or (50 if args.quick else 100)
    data = load_beir(args.beir)
    checkpoint, bundle = build_seeded(COLBERT_NAME)

    cand_path = CACHE / f"candidates-{data.name}.json"
    if cand_path.is_file():
        saved = json.loads(cand_path.read_text())["candidates"]
        source = f"the first {n_candidates} of the bi-encoder top 100 of the service section's retrieve run"
    else:
        saved = {}
        source = "the first corpus documents (bench/.cache/candidates file missing)"
    qids = sorted(q for q in data.queries if q in saved) or sorted(data.queries)
    qids = random.Random(0).sample(qids, min(n_queries, len(qids)))
    first = list(data.corpus)[:n_candidates]
    cases = [(q, [d for d in saved.get(q, first) if d in data.corpus][:n_candidates]) for q in qids]
    union = list(dict.fromkeys(d for _, docs in cases for d in docs))
    position = {d: i for i, d in enumerate(union)}
    texts = [data.corpus[d] for d in union]
    log(f"{len(cases)} queries x {n_candidates} candidates ({source}); {len(union)} distinct documents")

    runner = ColbertRunner(bundle, intra_op_threads=threads)
    runner.warmup()
    t = time.perf_counter()
    matrices = runner.document_token_vectors(texts, BATCH)
    # int8 unpooled (pool_factor 1, a collection option): the same rows the peers score, so agreement
    # measures the implementations; and the default format (int8, pool 4), what a new collection stores.
    formats = {"pool1": TokenFormat(pool_factor=1), "pool4": DEFAULT_TOKEN_FORMAT}
    blobs = {
        name: dict(zip(union, compress_many(matrices, fmt), strict=True)) for name, fmt in formats.items()
    }
    encode_s = {"sieve": time.perf_counter() - t}
    log(f"  sieve encoded {len(texts)} documents in {encode_s['sieve']:.1f} s")

    peers: dict[str, Peer] = {}
    peer_info: dict[str, Any] = {}
    try:
        log("starting colbert-ai (its own process)")
        peers["colbert-ai"] = Peer(sys.executable, "colbert-ai", checkpoint, threads)
        pylate_python = os.environ.get("SIEVE_PYLATE_PYTHON")
        if pylate_python:
            log(f"starting PyLate ({pylate_python})")
            peers["pylate"] = Peer(pylate_python, "pylate", checkpoint, threads)
        else:
            log(
                "PyLate skipped: SIEVE_PYLATE_PYTHON is not set (tests/integration/test_colbert.py says how to build one)"
            )
        for name, peer in peers.items():
            encode_s[name] = peer.ask(documents=texts)["seconds"]
            peer_info[name] = peer.info
            log(f"  {name} encoded {len(texts)} documents in {encode_s[name]:.1f} s")

        # Each side at T threads, and the in-memory sides at 1 thread too: on a busy machine torch's thread
        # pool, called back to back, degrades far more than onnxruntime's, and 1 thread is its best case.
        runner1 = ColbertRunner(bundle, intra_op_threads=1)
        runner1.warmup()
        names = [
            "sieve_store",
            "sieve_store_pool4",
            "sieve_memory",
            *peers,
            "sieve_memory_1t",
            *(f"{p}_1t" for p in peers),
        ]
        ms: dict[str, list[float]] = {name: [] for name in names}
        agreement: dict[str, list[tuple[float, int]]] = {p: [] for p in peers}
        with token_store(blobs, formats) as (store, cids, doc_keys):

            def sieve_store(query: str, docs: list[str], name: str = "pool1") -> list[float]:
                # the server: query token rows (a colbert worker's sieve.query_tokens, here in-process),
                # the candidates' blobs by key from the store, prepare_query + maxsim_blobs
                q = runner.query_token_vectors([query])[0]
                wanted = [doc_keys[name][d] for d in docs]
                found = store.token_blobs(cids[name], wanted)
                q = prepare_query(q, formats[name])
                return [float(s) for s in maxsim_blobs(q, [found[k] for k in wanted])]

            def sieve_memory(query: str, docs: list[str], one_thread: bool = False) -> list[float]:
                q = (runner1 if one_thread else runner).query_token_vectors([query])[0]
                return [float(s) for s in maxsim_blobs(q, [blobs["pool1"][d] for d in docs])]

            sides = list(ms)
            for warm in (True, False):
                for r, (qid, docs) in enumerate(cases[:1] if warm else cases):
                    query = data.queries[qid]
                    scores: dict[str, list[float]] = {}
                    for side in sides[r % len(sides) :] + sides[: r % len(sides)]:
                        peer = side.removesuffix("_1t")
                        if peer in peers:
                            n = 1 if side.endswith("_1t") else threads
                            answer = peers[peer].ask(
                                query=query, indices=[position[d] for d in docs], threads=n
                            )
                            seconds, scores[side] = answer["seconds"], answer["scores"]
                        else:
                            t = time.perf_counter()
                            if side == "sieve_store":
                                scores[side] = sieve_store(query, docs)
                            elif side == "sieve_store_pool4":
                                scores[side] = sieve_store(query, docs, "pool4")
                            else:
                                scores[side] = sieve_memory(query, docs, side.endswith("_1t"))
                            seconds = time.perf_counter() - t
                        if not warm:
                            ms[side].append(seconds * 1000)
                    if not warm:
                        for p in peers:
                            agreement[p].append(
                                (
                                    spearman(scores["sieve_store"], scores[p]),
                                    top_overlap(scores["sieve_store"], scores[p]),
                                )
                            )
                    if not warm:
                        log(
                            f"  query {r + 1}/{len(cases)}: "
                            + ", ".join(f"{s} {ms[s][-1]:.1f} ms" for s in sides)
                        )
    finally:
        for peer in peers.values():
            peer.close()

    stats = {side: percentiles(v) for side, v in ms.items()}
    log("ms per query (p50): " + ", ".join(f"{s} {stats[s]['p50_ms']:.1f}" for s in stats))
    argv = [str(args.beir)] + (["--quick"] if args.quick else [])
    if args.queries:
        argv += ["--queries", str(args.queries)]
    if args.candidates:
        argv += ["--candidates", str(args.candidates)]
    write_result(
        "late-interaction-peers",
        {
            "benchmark": "late-interaction-peers",
            "dataset": data.name,
            "model": runner.model_id,
            "model_note": "seeded colbert-ir checkpoint (MiniLM + seeded 384->128 projection): speed and "
            "agreement only, no ranking quality",
            "queries": len(cases),
            "candidates": n_candidates,
            "candidate_source": source,
            "documents_encoded": len(texts),
            "threads": threads,
            "ms_per_query": stats,
            "documents_per_s": {side: len(texts) / s for side, s in encode_s.items()},
            "agreement_vs_sieve": {
                p: {
                    "spearman_mean": float(np.mean([a for a, _ in v])),
                    "spearman_min": float(np.min([a for a, _ in v])),
                    "top10_overlap_mean": float(np.mean([b for _, b in v])),
                }
                for p, v in agreement.items()
            },
            "peers": peer_info,
            "pylate": "run" if "pylate" in peer_info else "skipped: SIEVE_PYLATE_PYTHON not set",
        },
        command=command_line("bench/late_interaction_peers.py", argv),
        quick=args.quick,
        started=started,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
