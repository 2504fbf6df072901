"""DocumentService calls."""

from __future__ import annotations

from collections.abc import Iterable

from sieve import _build
from sieve._build import DocumentArg
from sieve._sync.base import ClientBase
from sieve.v1 import documents_pb2


class DocumentCalls(ClientBase):
    def upsert_documents(
        self,
        collection: str,
        documents: Iterable[DocumentArg],
        *,
        embedding_model: str = "",
        timeout: float | None = None,
    ) -> documents_pb2.UpsertDocumentsResponse:
        """Insert or replace documents (messages or {"id", "text", "metadata"} dicts) as one atomic batch.
        The response's `generation` can be passed to `search(min_generation=...)` to read this write.
        Documents may carry their own vectors ({"vector": [...]}, a list or a numpy array), stored instead
        of embedding the text; `embedding_model` must then name the collection's model (name or
        name@revision), so that they are comparable with its queries."""
        request = _build.upsert(collection, documents, embedding_model)
        return self._unary(
            "DocumentService/UpsertDocuments",
            self._documents.UpsertDocuments,
            request,
            self.timeouts.write if timeout is None else timeout,
        )

    def get_documents(
        self, collection: str, ids: Iterable[str], *, timeout: float | None = None
    ) -> documents_pb2.GetDocumentsResponse:
        request = documents_pb2.GetDocumentsRequest(collection=collection, ids=list(ids))
        return self._unary("DocumentService/GetDocuments", self._documents.GetDocuments, request, timeout)

    def delete_documents(
        self, collection: str, ids: Iterable[str], *, timeout: float | None = None
    ) -> documents_pb2.DeleteDocumentsResponse:
        request = documents_pb2.DeleteDocumentsRequest(collection=collection, ids=list(ids))
        return self._unary(
            "DocumentService/DeleteDocuments",
            self._documents.DeleteDocuments,
            request,
            self.timeouts.write if timeout is None else timeout,
        )
