"""Task contracts between the server and the Celery workers: small, validated, plain-JSON payloads.

Every task takes one request's `to_json()` (a dict of JSON types) and returns one result's `to_json()`;
both sides rebuild the typed object with `from_json`, which validates it (unknown fields, wrong types
and out-of-range sizes raise `pydantic.ValidationError`, a ValueError). Nothing here is pickled.

Vectors travel as base64 of little-endian float32, row-major: a 384-d vector is 512 characters instead
of ~3 KB as a JSON list of floats, and decodes without a Python loop.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Annotated, Any, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Upper bounds on one task's payload: the server splits larger jobs (one embed task is one ONNX job
# of tens of seconds at most; a re-rank stage sees hundreds of candidates, not thousands).
MAX_EMBED_TEXTS = 1000
MAX_CANDIDATES = 2000
MAX_TEXT_CHARS = 65_536

TokenFormat = Literal["int8", "fp16"]
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


class EmbedRequest(_Contract):
    """Embed texts with a bi-encoder bundle; with `want_tokens`, also cache each text's token vectors."""

    texts: list[Text] = Field(min_length=1, max_length=MAX_EMBED_TEXTS)
    model: str
    want_tokens: bool = False
    # The late-interaction bundle whose document token vectors to cache (a `colbert` bundle); None: the
    # bi-encoder's own token vectors, from the same encoder run as the sentence vectors.
    token_model: str | None = None
    token_format: TokenFormat = "int8"

    _model = field_validator("model")(_check_model_name)

    @field_validator("token_model")
    @classmethod
    def _token_model(cls, value: str | None) -> str | None:
        return None if value is None else _check_model_name(value)


class EmbedResult(_Contract):
    model_id: str  # name@revision of the bundle that computed the vectors
    dims: int = Field(ge=1)
    vectors_b64: str  # see encode_vectors
    # Cache keys of the token blobs, one per text in order (empty unless want_tokens).
    token_keys: list[str] = Field(default_factory=list)
    tokens_computed: int = Field(0, ge=0)  # blobs encoded now; the rest were already cached

    def vectors(self) -> np.ndarray:
        return decode_vectors(self.vectors_b64, self.dims)

    @classmethod
    def build(cls, model_id: str, vectors: np.ndarray, token_keys: list[str], tokens_computed: int) -> Self:
        return cls(
            model_id=model_id,
            dims=int(vectors.shape[1]),
            vectors_b64=encode_vectors(vectors),
            token_keys=token_keys,
            tokens_computed=tokens_computed,
        )


class Candidate(_Contract):
    """One document to re-rank: its content hash (the cache address) and its text (for a miss)."""

    content_hash: str
    text: Text

    @model_validator(mode="after")
    def _hash_matches_text(self) -> Self:
        # A wrong hash would file the text's token vectors under another document's key: refuse it.
        if not _HASH_HEX.match(self.content_hash):
            raise ValueError(f"content_hash must be 32 lowercase hex digits, got {self.content_hash!r}")
        if content_hash_hex(self.text) != self.content_hash:
            raise ValueError(f"content_hash {self.content_hash} is not the hash of the candidate's text")
        return self

    @classmethod
    def of(cls, text: str) -> Self:
        return cls(content_hash=content_hash_hex(text), text=text)


class LateInteractionRequest(_Contract):
    """MaxSim re-rank of candidates for a query, from cached document token vectors."""

    query: Text = Field(min_length=1)
    model: str
    candidates: list[Candidate] = Field(max_length=MAX_CANDIDATES)
    token_format: TokenFormat = "int8"

    _model = field_validator("model")(_check_model_name)


class LateInteractionResult(_Contract):
    model_id: str
    scores: list[float]  # one per candidate, in the request's order
    cache_hits: int = Field(ge=0)  # candidates whose token blob came from Redis
    recomputed: int = Field(ge=0)  # candidates encoded now (missing or unreadable blob), then cached
    bytes_read: int = Field(0, ge=0)  # token-blob bytes fetched from Redis


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
