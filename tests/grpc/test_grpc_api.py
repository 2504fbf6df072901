"""The sieve.v1 API against a real in-process server: collections, documents, search, health, reflection."""

from __future__ import annotations

import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, search_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")

DOCS = {
    "cat": ("The cat sat on the warm mat and purred.", {"kind": "animal", "lang": "en"}),
    "dog": ("A dog barked at the postman all morning.", {"kind": "animal", "lang": "en"}),
    "quark": ("Quarks are bound by the strong force inside protons.", {"kind": "physics", "lang": "en"}),
    "bread": ("Knead the dough, let it rise, then bake the bread.", {"kind": "cooking", "lang": "en"}),
    "katze": ("Die Katze schläft auf dem Sofa.", {"kind": "animal", "lang": "de"}),
}


def _name() -> str:
    return f"c-{uuid.uuid4().hex[:10]}"


async def _collection_with_docs(api, name: str | None = None) -> str:  # type: ignore[no-untyped-def]
    name = name or _name()
    await api.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name))
    )
    docs = [documents_pb2.Document(id=i, text=t, metadata=m) for i, (t, m) in DOCS.items()]
    await api.documents.UpsertDocuments(documents_pb2.UpsertDocumentsRequest(collection=name, documents=docs))
    return name


async def test_collection_lifecycle(api) -> None:  # type: ignore[no-untyped-def]
    name = _name()
    created = await api.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(
            collection=collections_pb2.Collection(
                name=name,
                metric=common_pb2.METRIC_COSINE,
                defaults=common_pb2.SearchSettings(retrieve_candidates=50),
            )
        )
    )
    c = created.collection
    assert (c.name, c.embedding_model, c.dimensions, c.document_count, c.generation) == (
        name,
        "all-MiniLM-L6-v2",
        384,
        0,
        0,
    )
    assert c.embedding_model_id.startswith("all-MiniLM-L6-v2@")
    assert c.defaults.retrieve_candidates == 50
    listed = await api.collections.ListCollections(collections_pb2.ListCollectionsRequest())
    assert name in [x.name for x in listed.collections]
    await api.collections.DeleteCollection(collections_pb2.DeleteCollectionRequest(name=name))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_upsert_get_delete_and_generation(api) -> None:  # type: ignore[no-untyped-def]
    name = await _collection_with_docs(api)
    info = (await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))).collection
    assert info.document_count == len(DOCS) and info.generation == 1

    # Idempotent by id: the same upsert again changes nothing but the generation.
    again = await api.documents.UpsertDocuments(
        documents_pb2.UpsertDocumentsRequest(
            collection=name,
            documents=[documents_pb2.Document(id="cat", text=DOCS["cat"][0], metadata=DOCS["cat"][1])],
        )
    )
    assert again.generation == 2
    # Replacing text and metadata.
    await api.documents.UpsertDocuments(
        documents_pb2.UpsertDocumentsRequest(
            collection=name,
            documents=[documents_pb2.Document(id="dog", text="Dogs love long walks.", metadata={"v": "2"})],
        )
    )
    got = await api.documents.GetDocuments(
        documents_pb2.GetDocumentsRequest(collection=name, ids=["dog", "nope", "cat"])
    )
    assert [d.id for d in got.documents] == ["dog", "cat"]
    assert got.documents[0].text == "Dogs love long walks." and dict(got.documents[0].metadata) == {"v": "2"}
    assert list(got.missing_ids) == ["nope"]

    deleted = await api.documents.DeleteDocuments(
        documents_pb2.DeleteDocumentsRequest(collection=name, ids=["cat", "nope"])
    )
    assert (deleted.deleted, deleted.not_found, deleted.generation) == (1, 1, 4)
    info = (await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))).collection
    assert info.document_count == len(DOCS) - 1 and info.generation == 4
    hits = (
        await api.search.Search(search_pb2.SearchRequest(collection=name, query="a cat on a mat", top_k=10))
    ).hits
    assert "cat" not in [h.id for h in hits]


async def test_search_ranks_and_reports_stages(api) -> None:  # type: ignore[no-untyped-def]
    name = await _collection_with_docs(api)
    resp = await api.search.Search(
        search_pb2.SearchRequest(collection=name, query="subatomic particles", top_k=3)
    )
    assert [h.id for h in resp.hits][0] == "quark"
    assert len(resp.hits) == 3
    scores = [h.score for h in resp.hits]
    assert scores == sorted(scores, reverse=True)
    assert resp.hits[0].text == DOCS["quark"][0] and dict(resp.hits[0].metadata) == DOCS["quark"][1]
    assert resp.hits[0].stage_scores[0].stage == common_pb2.STAGE_RETRIEVE
    assert resp.hits[0].stage_scores[0].score == pytest.approx(resp.hits[0].score)
    assert [s.stage for s in resp.stages] == [
        common_pb2.STAGE_RETRIEVE,
        common_pb2.STAGE_LATE_INTERACTION,
        common_pb2.STAGE_CROSS_ENCODER,
    ]
    retrieve = resp.stages[0]
    assert retrieve.status == search_pb2.STAGE_STATUS_COMPLETED and retrieve.candidates_out == 3
    assert retrieve.took_ms > 0 and retrieve.model_id.startswith("all-MiniLM-L6-v2@")
    assert all(s.status == search_pb2.STAGE_STATUS_SKIPPED for s in resp.stages[1:])
    assert resp.generation == 1

    slim = await api.search.Search(
        search_pb2.SearchRequest(collection=name, query="subatomic particles", top_k=1, omit_documents=True)
    )
    assert slim.hits[0].id == "quark" and slim.hits[0].text == "" and not slim.hits[0].metadata


async def test_unconfigured_rerank_stage_degrades_or_fails(api) -> None:  # type: ignore[no-untyped-def]
    name = await _collection_with_docs(api)
    best_effort = await api.search.Search(
        search_pb2.SearchRequest(
            collection=name,
            query="bread",
            top_k=2,
            settings=common_pb2.SearchSettings(cross_encoder=common_pb2.STAGE_MODE_BEST_EFFORT),
        )
    )
    ce = best_effort.stages[2]
    assert ce.status == search_pb2.STAGE_STATUS_DEGRADED and "no cross_encoder model" in ce.reason
    assert best_effort.hits[0].id == "bread"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.search.Search(
            search_pb2.SearchRequest(
                collection=name,
                query="bread",
                settings=common_pb2.SearchSettings(cross_encoder=common_pb2.STAGE_MODE_REQUIRED),
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The message names what is missing and how to fix it.
    assert "no cross_encoder model is configured" in err.value.details()
    assert "sieve models export cross-encoder" in err.value.details()
    assert "SIEVE_CROSS_ENCODER_MODEL" in err.value.details()


async def test_filter_exact_match_all_conditions(api) -> None:  # type: ignore[no-untyped-def]
    name = await _collection_with_docs(api)

    def flt(**kv: str) -> common_pb2.Filter:
        return common_pb2.Filter(all=[common_pb2.Condition(key=k, equals=v) for k, v in kv.items()])

    resp = await api.search.Search(
        search_pb2.SearchRequest(
            collection=name, query="a sleeping cat", top_k=10, filter=flt(kind="animal", lang="de")
        )
    )
    assert [h.id for h in resp.hits] == ["katze"]
    resp = await api.search.Search(
        search_pb2.SearchRequest(collection=name, query="a sleeping cat", top_k=10, filter=flt(kind="animal"))
    )
    assert sorted(h.id for h in resp.hits) == ["cat", "dog", "katze"]
    resp = await api.search.Search(
        search_pb2.SearchRequest(
            collection=name, query="a sleeping cat", top_k=10, filter=flt(kind="nothing")
        )
    )
    assert list(resp.hits) == []


async def test_health_and_reflection(api) -> None:  # type: ignore[no-untyped-def]
    health = health_pb2_grpc.HealthStub(api.channel)
    for service in ("", "sieve.v1.SearchService", "sieve.v1.DocumentService", "sieve.v1.CollectionService"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(api.channel)

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    services = []
    async for resp in stub.ServerReflectionInfo(requests()):
        services = [s.name for s in resp.list_services_response.service]
    assert {
        "sieve.v1.SearchService",
        "sieve.v1.DocumentService",
        "sieve.v1.CollectionService",
        "grpc.health.v1.Health",
    } <= set(services)
