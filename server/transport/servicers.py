"""Thin gRPC servicers: translate messages, call the engine. Errors are mapped by server.errors."""

from __future__ import annotations

from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    documents_pb2,
    documents_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    search_pb2_grpc,
)

from server.core.engine import Engine
from server.jobs.manager import JobManager
from server.transport import convert


class CollectionServicer(collections_pb2_grpc.CollectionServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def CreateCollection(self, request, context):
        info = await self.engine.create_collection(convert.collection_spec(request.collection))
        return collections_pb2.CreateCollectionResponse(collection=convert.collection_to_pb(info))

    async def GetCollection(self, request, context):
        info = await self.engine.get_collection(request.name)
        return collections_pb2.GetCollectionResponse(collection=convert.collection_to_pb(info))

    async def ListCollections(self, request, context):
        infos = await self.engine.list_collections()
        return collections_pb2.ListCollectionsResponse(
            collections=[convert.collection_to_pb(i) for i in infos]
        )

    async def DeleteCollection(self, request, context):
        await self.engine.delete_collection(request.name)
        return collections_pb2.DeleteCollectionResponse()


class DocumentServicer(documents_pb2_grpc.DocumentServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def UpsertDocuments(self, request, context):
        result = await self.engine.upsert(
            request.collection,
            convert.documents_from_pb(request.documents),
            convert.vectors_from_pb(request.documents),
            request.embedding_model,
        )
        return documents_pb2.UpsertDocumentsResponse(generation=result.generation, upserted=result.count)

    async def GetDocuments(self, request, context):
        docs, missing = await self.engine.get_documents(request.collection, list(request.ids))
        return documents_pb2.GetDocumentsResponse(
            documents=[convert.document_to_pb(d) for d in docs], missing_ids=missing
        )

    async def DeleteDocuments(self, request, context):
        result = await self.engine.delete_documents(request.collection, list(request.ids))
        return documents_pb2.DeleteDocumentsResponse(
            generation=result.generation, deleted=result.count, not_found=result.not_found
        )


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def Search(self, request, context):
        # Validated once, by the engine (min_generation and the wait for it included).
        result = await self.engine.search(convert.search_query(request), context.time_remaining())
        return convert.search_result_to_pb(result)

    async def SearchStream(self, request, context):
        query = convert.search_query(request)
        # Headers now, while the search runs: the first ranking then goes out as one DATA frame.
        await context.send_initial_metadata(())
        async for update in self.engine.search_stream(query, context.time_remaining()):
            yield convert.search_update_to_pb(update)


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, jobs: JobManager) -> None:
        self.jobs = jobs

    async def StartIndexJob(self, request, context):
        view = await self.jobs.start_file_job(
            request.collection, request.path, request.format, request.batch_size
        )
        return jobs_pb2.StartIndexJobResponse(job=convert.job_to_pb(view))

    async def UploadIndexJob(self, request_iterator, context):
        view = await self.jobs.upload_job(convert.upload_chunks(request_iterator))
        return jobs_pb2.UploadIndexJobResponse(job=convert.job_to_pb(view))

    async def GetJob(self, request, context):
        view, errors, next_after = await self.jobs.get(
            request.id, request.errors_after_line, request.max_errors
        )
        return jobs_pb2.GetJobResponse(
            job=convert.job_to_pb(view),
            errors=convert.job_errors_to_pb(errors),
            next_errors_after_line=next_after,
        )

    async def WatchJob(self, request, context):
        async for view in self.jobs.watch(request.id, request.min_interval_ms):
            yield jobs_pb2.WatchJobResponse(job=convert.job_to_pb(view))

    async def CancelJob(self, request, context):
        view = await self.jobs.cancel(request.id)
        return jobs_pb2.CancelJobResponse(job=convert.job_to_pb(view))

    async def ListJobs(self, request, context):
        views = await self.jobs.list(request.collection, request.limit)
        return jobs_pb2.ListJobsResponse(jobs=[convert.job_to_pb(v) for v in views])
