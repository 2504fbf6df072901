"""Task contracts between the server and the Celery workers: small, validated, plain-JSON payloads.

Every task takes one request's `to_json()` (a dict of JSON types) and returns one result's `to_json()`;
both sides rebuild the typed object with `from_json`, which validates it (unknown fields, wrong types
and out-of-range sizes raise `pydantic.ValidationError`, a ValueError). Nothing here is pickled.

Vectors travel as base64 of little-endian float32, row-major: a 384-d vector is 512 characters instead
of ~3 KB as a JSON list of floats, and decodes without a Python loop. Token-vector blobs (already
compressed, sieve_core.token_format) travel as base64 too. No task carries candidate texts for late
interaction: the server scores MaxSim itself from its store; the only late-interaction task on the query
path encodes the query with a ColBERT bundle (QueryTokensRequest).
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Annotated, Any, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sieve_core.token_format import TokenFormat

# Upper bounds on one task's payload: the server splits larger jobs (one embed task is one ONNX job
# of tens of seconds at most; a cross-encoder stage sees hundreds of candidates, not thousands).
MAX_EMBED_TEXTS = 1000
MAX_CANDIDATES = 2000
MAX_TEXT_CHARS = 65_536

Codec = Literal["int4", "int8", "fp16"]
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HASH_HEX = re.compile(r"^[0-9a-f]{32}$")

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


def content_hash(text: str) -> bytes:
    """A document's content hash: sha256 of its UTF-8 text, first 16 bytes.

    The one definition: the store keeps it per document and cache keys carry its hex form, so a
    token blob written by a worker is found by the server from its store.
    """
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]


def content_hash_hex(text: str) -> str:
    return content_hash(text).hex()


class _Contract(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        # JSON has no tuples: lists are accepted where a field is a tuple (strict mode would refuse them).
        return cls.model_validate(data, strict=False)


# The base of every task payload (for type bounds outside this module).
Contract = _Contract


def _check_model_name(value: str) -> str:
    if not _MODEL_NAME.match(value):
        raise ValueError(f"model must be a bundle name (letters, digits, '.', '_', '-'), got {value!r}")
    return value


def encode_vectors(matrix: np.ndarray) -> str:
    """(n, dims) float array -> base64 of little-endian float32, row-major."""
    return base64.b64encode(np.ascontiguousarray(matrix, dtype="<f4").tobytes()).decode("ascii")


def decode_vectors(data: str, dims: int) -> np.ndarray:
    """Inverse of `encode_vectors`: a writable float32 array of shape (n, dims)."""
    raw = base64.b64decode(data.encode("ascii"), validate=True)
    if dims < 1 or len(raw) % (4 * dims):
        raise ValueError(f"vector payload of {len(raw)} bytes is not a whole number of {dims}-d float32 rows")
    return np.frombuffer(raw, dtype="<f4").reshape(-1, dims).astype(np.float32)


class TokenFormatSpec(_Contract):
    """sieve_core.token_format.TokenFormat as a contract field (the collection's recorded format)."""

    pool_factor: int = Field(ge=1, le=255)
    projection_dims: int = Field(ge=0, le=4096)
    codec: Codec = "int8"
    projection_seed: int = Field(0, ge=0, le=255)

    def format(self) -> TokenFormat:
        return TokenFormat(self.pool_factor, self.projection_dims, self.codec, self.projection_seed)

    @classmethod
    def of(cls, fmt: TokenFormat) -> Self:
        return cls.from_json(fmt.to_json())


class EmbedRequest(_Contract):
    """Embed texts with a bi-encoder bundle; with `token_format`, also return each text's token vectors,
    compressed in that format: the bi-encoder's own from the same encoder run (zero-shot), or `token_model`'s
    (a ColBERT bundle, its own pass) when given. The server stores them with the documents."""

    texts: list[Text] = Field(min_length=1, max_length=MAX_EMBED_TEXTS)
    model: str
    token_format: TokenFormatSpec | None = None
    token_model: str | None = None

    _model = field_validator("model")(_check_model_name)

    @field_validator("token_model")
    @classmethod
    def _token_model(cls, value: str | None) -> str | None:
        return None if value is None else _check_model_name(value)


def encode_blobs(blobs: list[bytes]) -> list[str]:
    return [base64.b64encode(b).decode("ascii") for b in blobs]


def decode_blobs(data: list[str]) -> list[bytes]:
    return [base64.b64decode(d.encode("ascii"), validate=True) for d in data]


class EmbedResult(_Contract):
    model_id: str  # name@revision of the bundle that computed the vectors
    dims: int = Field(ge=1)
    vectors_b64: str  # see encode_vectors
    # Compressed token vectors (sieve_core.token_format), base64, one per text in order; empty unless asked.
    token_blobs_b64: list[str] = Field(default_factory=list)
    token_model_id: str = ""  # the model that computed them

    def vectors(self) -> np.ndarray:
        return decode_vectors(self.vectors_b64, self.dims)

    def token_blobs(self) -> list[bytes]:
        return decode_blobs(self.token_blobs_b64)

    @classmethod
    def build(
        cls, model_id: str, vectors: np.ndarray, blobs: list[bytes] | None = None, token_model_id: str = ""
    ) -> Self:
        return cls(
            model_id=model_id,
            dims=int(vectors.shape[1]),
            vectors_b64=encode_vectors(vectors),
            token_blobs_b64=encode_blobs(blobs or []),
            token_model_id=token_model_id if blobs else "",
        )


class DocumentTokensRequest(_Contract):
    """Compute documents' token vectors (pending documents of a collection) in the collection's format."""

    texts: list[Text] = Field(min_length=1, max_length=MAX_EMBED_TEXTS)
    model: str  # a `colbert` or `bi_encoder` bundle
    token_format: TokenFormatSpec

    _model = field_validator("model")(_check_model_name)


class DocumentTokensResult(_Contract):
    model_id: str
    token_blobs_b64: list[str]  # one per text, in order

    def token_blobs(self) -> list[bytes]:
        return decode_blobs(self.token_blobs_b64)


class QueryTokensRequest(_Contract):
    """Encode one query into its token vectors with a ColBERT bundle (the server runs MaxSim itself)."""

    query: Text = Field(min_length=1)
    model: str

    _model = field_validator("model")(_check_model_name)


class QueryTokensResult(_Contract):
    model_id: str
    dims: int = Field(ge=1)
    rows_b64: str  # (query tokens, dims) float32, see encode_vectors

    def rows(self) -> np.ndarray:
        return decode_vectors(self.rows_b64, self.dims)


class Candidate(_Contract):
    """One document to re-rank by cross-encoder: its content hash (the cache address) and its text."""

    content_hash: str
    text: Text

    @model_validator(mode="after")
    def _hash_matches_text(self) -> Self:
        # A wrong hash would file the pair's score under another document's key: refuse it.
        if not _HASH_HEX.match(self.content_hash):
            raise ValueError(f"content_hash must be 32 lowercase hex digits, got {self.content_hash!r}")
        if content_hash_hex(self.text) != self.content_hash:
            raise ValueError(f"content_hash {self.content_hash} is not the hash of the candidate's text")
        return self

    @classmethod
    def of(cls, text: str) -> Self:
        return cls(content_hash=content_hash_hex(text), text=text)


class CrossEncoderRequest(_Contract):
    """Score (query, candidate) pairs with a cross-encoder bundle."""

    query: Text = Field(min_length=1)
    model: str
    candidates: list[Candidate] = Field(max_length=MAX_CANDIDATES)

    _model = field_validator("model")(_check_model_name)


class CrossEncoderResult(_Contract):
    model_id: str
    scores: list[float]  # one per candidate, in the request's order
    cache_hits: int = Field(ge=0)  # pairs whose score came from Redis
    computed: int = Field(ge=0)  # pairs run through the model now, then cached
