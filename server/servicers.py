"""Thin gRPC servicers: translate messages, call the engine. Errors are mapped by server.errors."""

from __future__ import annotations

from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    documents_pb2,
    documents_pb2_grpc,
    search_pb2_grpc,
)

from server import convert
from server.engine import Engine


class CollectionServicer(collections_pb2_grpc.CollectionServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def CreateCollection(self, request, context):  # type: ignore[no-untyped-def]
        info = await self.engine.create_collection(convert.collection_spec(request.collection))
        return collections_pb2.CreateCollectionResponse(collection=convert.collection_to_pb(info))

    async def GetCollection(self, request, context):  # type: ignore[no-untyped-def]
        info = await self.engine.get_collection(request.name)
        return collections_pb2.GetCollectionResponse(collection=convert.collection_to_pb(info))

    async def ListCollections(self, request, context):  # type: ignore[no-untyped-def]
        infos = await self.engine.list_collections()
        return collections_pb2.ListCollectionsResponse(
            collections=[convert.collection_to_pb(i) for i in infos]
        )

    async def DeleteCollection(self, request, context):  # type: ignore[no-untyped-def]
        await self.engine.delete_collection(request.name)
        return collections_pb2.DeleteCollectionResponse()


class DocumentServicer(documents_pb2_grpc.DocumentServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def UpsertDocuments(self, request, context):  # type: ignore[no-untyped-def]
        result = await self.engine.upsert(request.collection, convert.documents_from_pb(request.documents))
        return documents_pb2.UpsertDocumentsResponse(generation=result.generation, upserted=result.count)

    async def GetDocuments(self, request, context):  # type: ignore[no-untyped-def]
        docs, missing = await self.engine.get_documents(request.collection, list(request.ids))
        return documents_pb2.GetDocumentsResponse(
            documents=[convert.document_to_pb(d) for d in docs], missing_ids=missing
        )

    async def DeleteDocuments(self, request, context):  # type: ignore[no-untyped-def]
        result = await self.engine.delete_documents(request.collection, list(request.ids))
        return documents_pb2.DeleteDocumentsResponse(
            generation=result.generation, deleted=result.count, not_found=result.not_found
        )


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def Search(self, request, context):  # type: ignore[no-untyped-def]
        result = await self.engine.search(convert.search_query(request), context.time_remaining())
        return convert.search_result_to_pb(result)
