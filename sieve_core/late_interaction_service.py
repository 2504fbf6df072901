"""The logic behind the `embed`, `document_tokens` and `query_tokens` worker tasks, callable in-process too.

Takes runners, never a Celery object, so the server runs the same code in its own executor (zero-shot
writes, no-Redis index jobs) and tests can drive it directly.

Where token vectors live (issue 13): in the collection's store on the server, written with the
documents. These functions only compute and compress them (sieve_core.token_format); nothing here keeps
state or writes anywhere, so every task is idempotent. With the zero-shot default a document's sentence
vector and its token vectors come from ONE encoder run (`BiEncoderRunner.encode(tokens=True)`); a
separate ColBERT bundle needs its own pass, which runs on the embed workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from sieve_core.contracts import (
    DocumentTokensRequest,
    DocumentTokensResult,
    EmbedRequest,
    EmbedResult,
    QueryTokensRequest,
    QueryTokensResult,
    encode_blobs,
    encode_vectors,
)
from sieve_core.models.bundle import BundleManifest
from sieve_core.token_format import TokenFormat, compress_many


class TokenRunner(Protocol):
    """What late interaction needs from a model: BiEncoderRunner (zero-shot) and ColbertRunner have it."""

    model_id: str
    manifest: BundleManifest

    def query_token_vectors(self, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]: ...

    def document_token_vectors(self, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]: ...


class EmbedRunner(TokenRunner, Protocol):
    """A bi-encoder: sentence vectors, and token vectors from the same encoder run."""

    def encode(
        self, texts: Sequence[str], batch_size: int = 32, *, tokens: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray] | None]: ...


def encode_documents(
    runner: EmbedRunner, texts: Sequence[str], fmt: TokenFormat | None, batch_size: int = 32
) -> tuple[np.ndarray, list[bytes] | None]:
    """Sentence vectors and, with a format, compressed token vectors: one encoder run for both."""
    if fmt is None:
        return runner.encode(texts, batch_size)[0], None
    vectors, rows = runner.encode(texts, batch_size, tokens=True)
    assert rows is not None
    return vectors, compress_many(rows, fmt)


def embed(
    runner: EmbedRunner,
    request: EmbedRequest,
    *,
    token_runner: TokenRunner | None = None,
    batch_size: int = 32,
) -> EmbedResult:
    """Vectors for the texts; with a token format, their compressed token vectors too (in order).

    The token vectors come from `token_runner` (a ColBERT bundle, its own pass) when given, else from the
    bi-encoder's own encoder run, the same one that makes the sentence vectors.
    """
    fmt = request.token_format.format() if request.token_format is not None else None
    if token_runner is None or fmt is None:
        vectors, blobs = encode_documents(runner, request.texts, fmt, batch_size)
        return EmbedResult.build(runner.model_id, vectors, blobs, runner.model_id)
    vectors = runner.encode(request.texts, batch_size)[0]
    blobs = compress_many(token_runner.document_token_vectors(request.texts, batch_size), fmt)
    return EmbedResult.build(runner.model_id, vectors, blobs, token_runner.model_id)


def document_tokens(
    runner: TokenRunner, request: DocumentTokensRequest, *, batch_size: int = 32
) -> DocumentTokensResult:
    """Pending documents' token vectors, compressed in their collection's format."""
    rows = runner.document_token_vectors(request.texts, batch_size)
    blobs = compress_many(rows, request.token_format.format())
    return DocumentTokensResult(model_id=runner.model_id, token_blobs_b64=encode_blobs(blobs))


def query_tokens(runner: TokenRunner, request: QueryTokensRequest) -> QueryTokensResult:
    """One query's token vectors (float32, not pooled, not projected: the server prepares them)."""
    rows = runner.query_token_vectors([request.query])[0]
    return QueryTokensResult(model_id=runner.model_id, dims=int(rows.shape[1]), rows_b64=encode_vectors(rows))
