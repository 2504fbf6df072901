"""Every bad-input rule: a precise status and message, and nothing half-written."""

from __future__ import annotations

import uuid

import grpc
import pytest
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, search_pb2

from tests.conftest import make_settings, start_api, stop_api

pytestmark = pytest.mark.asyncio(loop_scope="session")
Code = grpc.StatusCode


async def _expect(call, code: grpc.StatusCode, fragment: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details(), err.value.details()


@pytest.fixture(scope="module")
def name() -> str:
    return f"bad-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module", autouse=True)
async def collection(api, name):  # type: ignore[no-untyped-def]
    await api.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name))
    )
    await api.documents.UpsertDocuments(
        documents_pb2.UpsertDocumentsRequest(
            collection=name, documents=[documents_pb2.Document(id="keep", text="an existing document")]
        )
    )


async def _state(api, name):  # type: ignore[no-untyped-def]
    c = (await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))).collection
    return c.document_count, c.generation


def _search(name: str, **kw) -> search_pb2.SearchRequest:  # type: ignore[no-untyped-def]
    kw.setdefault("query", "hello")
    return search_pb2.SearchRequest(collection=name, **kw)


@pytest.mark.parametrize(
    "query, fragment",
    [
        ("", "query is empty"),
        ("   \n\t", "query is empty"),
        ("x" * 4097, "query has 4097 characters; the limit is 4096"),
        ("nul\x00byte", "NUL"),
    ],
)
async def test_bad_query(api, name, query, fragment) -> None:  # type: ignore[no-untyped-def]
    await _expect(api.search.Search(_search(name, query=query)), Code.INVALID_ARGUMENT, fragment)


@pytest.mark.parametrize("top_k", [-1, 1001, 2**31 - 1])
async def test_top_k_out_of_range(api, name, top_k) -> None:  # type: ignore[no-untyped-def]
    await _expect(
        api.search.Search(_search(name, top_k=top_k)),
        Code.INVALID_ARGUMENT,
        "top_k must be between 1 and 1000",
    )


async def test_stage_settings_out_of_range(api, name) -> None:  # type: ignore[no-untyped-def]
    await _expect(
        api.search.Search(_search(name, settings=common_pb2.SearchSettings(retrieve_candidates=0))),
        Code.INVALID_ARGUMENT,
        "retrieve_candidates must be between 1 and 2000",
    )
    await _expect(
        api.search.Search(_search(name, settings=common_pb2.SearchSettings(cross_encoder=42))),
        Code.INVALID_ARGUMENT,
        "unknown stage mode 42",
    )


async def test_unknown_collection(api) -> None:  # type: ignore[no-untyped-def]
    await _expect(
        api.search.Search(_search("no-such")), Code.NOT_FOUND, "collection 'no-such' does not exist"
    )
    await _expect(
        api.documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(
                collection="no-such", documents=[documents_pb2.Document(id="a", text="b")]
            )
        ),
        Code.NOT_FOUND,
        "'no-such'",
    )
    await _expect(
        api.documents.GetDocuments(documents_pb2.GetDocumentsRequest(collection="no-such", ids=["a"])),
        Code.NOT_FOUND,
        "'no-such'",
    )
    await _expect(
        api.documents.DeleteDocuments(documents_pb2.DeleteDocumentsRequest(collection="no-such", ids=["a"])),
        Code.NOT_FOUND,
        "'no-such'",
    )
    await _expect(
        api.collections.GetCollection(collections_pb2.GetCollectionRequest(name="no-such")),
        Code.NOT_FOUND,
        "'no-such'",
    )
    await _expect(
        api.collections.DeleteCollection(collections_pb2.DeleteCollectionRequest(name="no-such")),
        Code.NOT_FOUND,
        "'no-such'",
    )


@pytest.mark.parametrize("bad_name", ["", "has space", "-leading", "x" * 65, "slash/name", "ünï"])
async def test_invalid_collection_name(api, bad_name) -> None:  # type: ignore[no-untyped-def]
    await _expect(
        api.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=bad_name))
        ),
        Code.INVALID_ARGUMENT,
        "collection name",
    )


async def test_collection_created_twice(api, name) -> None:  # type: ignore[no-untyped-def]
    await _expect(
        api.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name))
        ),
        Code.ALREADY_EXISTS,
        f"collection {name!r} already exists",
    )


async def test_collection_bad_model_or_metric(api) -> None:  # type: ignore[no-untyped-def]
    await _expect(
        api.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(
                collection=collections_pb2.Collection(name="m1", embedding_model="no-such-model")
            )
        ),
        Code.FAILED_PRECONDITION,
        "embedding model 'no-such-model' is not available",
    )
    await _expect(
        api.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(
                collection=collections_pb2.Collection(name="m2", metric=99)
            )
        ),
        Code.INVALID_ARGUMENT,
        "unknown metric 99",
    )


def _docs(*pairs: tuple[str, str], **meta: str) -> list[documents_pb2.Document]:
    return [documents_pb2.Document(id=i, text=t, metadata=meta) for i, t in pairs]


@pytest.mark.parametrize(
    "docs, fragment",
    [
        (
            _docs(("a", "one"), ("b", "two"), ("a", "three")),
            "duplicate document id 'a' in the batch (documents[2])",
        ),
        (_docs(("a", "one"), ("b", "")), "documents[1] (id 'b') has empty text"),
        (_docs(("a", "one"), ("b", "  \n ")), "documents[1] (id 'b') has empty text"),
        (_docs(("a", "one"), ("", "two")), "documents[1] has an empty id"),
        (_docs(("a", "one"), ("b" * 257, "two")), "id has 257 characters; the limit is 256"),
        (_docs(("a", "x" * 65_537)), "text has 65537 characters; the limit is 65536"),
        (_docs(("a", "bad\x00text")), "NUL"),
        ([], "no documents in the request"),
        (
            _docs(*[(f"d{i}", "t") for i in range(501)]),
            "batch of 501 documents is larger than the limit of 500",
        ),
        (
            [documents_pb2.Document(id="a", text="t", metadata={"": "v"})],
            "metadata key '' must have 1-128 characters",
        ),
        (
            [documents_pb2.Document(id="a", text="t", metadata={f"k{i}": "v" for i in range(65)})],
            "65 metadata entries; the limit is 64",
        ),
    ],
)
async def test_bad_batches_write_nothing(api, name, docs, fragment) -> None:  # type: ignore[no-untyped-def]
    before = await _state(api, name)
    await _expect(
        api.documents.UpsertDocuments(documents_pb2.UpsertDocumentsRequest(collection=name, documents=docs)),
        Code.INVALID_ARGUMENT,
        fragment,
    )
    assert await _state(api, name) == before
    got = await api.documents.GetDocuments(
        documents_pb2.GetDocumentsRequest(collection=name, ids=["a", "b", "keep"])
    )
    assert [d.id for d in got.documents] == ["keep"]


@pytest.mark.parametrize(
    "conditions, fragment",
    [
        ([common_pb2.Condition(key="kind")], "filter.all[0] (key 'kind') has no match; set `equals`"),
        ([common_pb2.Condition(key="", equals="x")], "filter.all[0] has an empty key"),
        (
            [common_pb2.Condition(key=f"k{i}", equals="v") for i in range(17)],
            "filter has 17 conditions; the limit is 16",
        ),
    ],
)
async def test_malformed_filter(api, name, conditions, fragment) -> None:  # type: ignore[no-untyped-def]
    await _expect(
        api.search.Search(_search(name, filter=common_pb2.Filter(all=conditions))),
        Code.INVALID_ARGUMENT,
        fragment,
    )


async def test_bad_id_lists(api, name) -> None:  # type: ignore[no-untyped-def]
    await _expect(
        api.documents.GetDocuments(documents_pb2.GetDocumentsRequest(collection=name)),
        Code.INVALID_ARGUMENT,
        "no ids in the request",
    )
    await _expect(
        api.documents.DeleteDocuments(documents_pb2.DeleteDocumentsRequest(collection=name, ids=["ok", ""])),
        Code.INVALID_ARGUMENT,
        "ids[1] has an empty id",
    )


async def test_oversized_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    small = await start_api(make_settings(tmp_path, max_message_bytes=64 * 1024))
    try:
        await small.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name="big"))
        )
        await _expect(
            small.documents.UpsertDocuments(
                documents_pb2.UpsertDocumentsRequest(
                    collection="big", documents=_docs(*[(f"d{i}", "word " * 200) for i in range(100)])
                )
            ),
            Code.RESOURCE_EXHAUSTED,
            "larger than max",
        )
        info = (
            await small.collections.GetCollection(collections_pb2.GetCollectionRequest(name="big"))
        ).collection
        assert info.document_count == 0 and info.generation == 0
    finally:
        await stop_api(small)


# -- found by tests/system/test_fuzz.py ------------------------------------------------------------------------
def _jobs(api):  # type: ignore[no-untyped-def]
    from sieve.v1 import jobs_pb2_grpc

    return jobs_pb2_grpc.JobServiceStub(api.channel)


@pytest.mark.parametrize(
    "path, fragment",
    [
        # A name longer than the file system allows made is_dir() raise ENAMETOOLONG: INTERNAL.
        ("/tmp/" + "x" * 300, "the server cannot read '/tmp/xxxx"),
        ("/tmp/" + "x/" * 3000, "path has 6005 bytes; the limit is 4096"),
        ("/tmp/a\x00b.jsonl", "path contains a NUL character"),
        # The whole path was echoed: past ~16 KB the client got RESOURCE_EXHAUSTED "metadata size exceeds".
        ("r" * 4000, "path 'rrrr"),
    ],
)
async def test_unusable_job_paths(api, name, path, fragment) -> None:  # type: ignore[no-untyped-def]
    from sieve.v1 import jobs_pb2

    request = jobs_pb2.StartIndexJobRequest(collection=name, path=path)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _jobs(api).StartIndexJob(request)
    assert err.value.code() == Code.INVALID_ARGUMENT, err.value.details()
    assert fragment in err.value.details()
    assert len(err.value.details()) < 400


async def test_client_values_are_quoted_short_in_messages(api, name) -> None:  # type: ignore[no-untyped-def]
    """A status message quotes at most ~80 characters of a client's value (it was the whole value)."""
    from sieve.v1 import jobs_pb2

    long = "m" * 20_000
    calls = [
        api.search.Search(_search(name, settings=common_pb2.SearchSettings(late_interaction_model=long))),
        api.search.Search(_search(name, filter=common_pb2.Filter(all=[common_pb2.Condition(key=long)]))),
        _jobs(api).UploadIndexJob(
            iter(
                [
                    jobs_pb2.UploadIndexJobRequest(collection=name),
                    jobs_pb2.UploadIndexJobRequest(collection=long),
                ]
            )
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == Code.INVALID_ARGUMENT, err.value.details()
        assert "(20000 characters)" in err.value.details()
        assert len(err.value.details()) < 400


@pytest.mark.parametrize("model", ["x" * 300, "a\x00b", "../models", "ok\n"])
async def test_bad_embedding_model_names(api, model) -> None:  # type: ignore[no-untyped-def]
    """A name too long for the file system was an INTERNAL error (ENAMETOOLONG); NUL reached the path."""
    await _expect(
        api.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(
                collection=collections_pb2.Collection(name="m3", embedding_model=model)
            )
        ),
        Code.INVALID_ARGUMENT,
        "embedding_model must be a bundle name",
    )


async def test_names_with_a_trailing_newline(api, name) -> None:  # type: ignore[no-untyped-def]
    """`re.match(r"...$")` accepts "name\\n": such a collection could be created."""
    await _expect(
        api.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name="newline\n"))
        ),
        Code.INVALID_ARGUMENT,
        "invalid collection name 'newline\\n'",
    )
    await _expect(
        api.search.Search(_search(name, settings=common_pb2.SearchSettings(cross_encoder_model="m\n"))),
        Code.INVALID_ARGUMENT,
        "settings.cross_encoder_model must be a bundle name",
    )
