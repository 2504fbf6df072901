"""CollectionService calls."""

from __future__ import annotations

from collections.abc import Mapping

from sieve import _build
from sieve._build import MetricArg, SettingsArg
from sieve._sync.base import ClientBase
from sieve.v1 import collections_pb2


class CollectionCalls(ClientBase):
    def create_collection(
        self,
        name: str,
        *,
        embedding_model: str = "",
        metric: MetricArg = None,
        defaults: SettingsArg = None,
        token_storage: Mapping[str, int] | None = None,
        timeout: float | None = None,
    ) -> collections_pb2.Collection:
        """Create a collection (ALREADY_EXISTS -> `AlreadyExists`). `defaults`: the collection's default
        search settings, e.g. {"late_interaction": "best_effort", "retrieve_candidates": 100}.
        `token_storage`: store late-interaction token vectors in this format, e.g. {"pool_factor": 4}
        or {"pool_factor": 2, "projection_dims": 128} ({} for the server's default format)."""
        request = _build.create_collection(name, embedding_model, metric, defaults, token_storage)
        response = self._unary(
            "CollectionService/CreateCollection", self._collections.CreateCollection, request, timeout
        )
        return response.collection

    def get_collection(self, name: str, *, timeout: float | None = None) -> collections_pb2.Collection:
        request = collections_pb2.GetCollectionRequest(name=name)
        response = self._unary(
            "CollectionService/GetCollection", self._collections.GetCollection, request, timeout
        )
        return response.collection

    def list_collections(self, *, timeout: float | None = None) -> list[collections_pb2.Collection]:
        request = collections_pb2.ListCollectionsRequest()
        response = self._unary(
            "CollectionService/ListCollections", self._collections.ListCollections, request, timeout
        )
        return list(response.collections)

    def delete_collection(self, name: str, *, timeout: float | None = None) -> None:
        request = collections_pb2.DeleteCollectionRequest(name=name)
        self._unary(
            "CollectionService/DeleteCollection", self._collections.DeleteCollection, request, timeout
        )
