"""Quickstart: create a collection, add documents, search. Needs only `pip install ./clients/python`.

python examples/python/quickstart.py [--address 127.0.0.1:50051] [--collection quickstart]
"""

import argparse
import contextlib

from sieve import AlreadyExists, SieveClient

parser = argparse.ArgumentParser()
parser.add_argument("--address", default="127.0.0.1:50051")
parser.add_argument("--collection", default="quickstart")
args = parser.parse_args()

with SieveClient(args.address) as client:
    with contextlib.suppress(AlreadyExists):  # a second run reuses it; upserts are idempotent by id
        client.create_collection(args.collection)
    written = client.upsert_documents(
        args.collection,
        [
            {"id": "cat", "text": "The cat sat on the warm mat.", "metadata": {"topic": "animals"}},
            {
                "id": "quark",
                "text": "Quarks are bound by the strong force.",
                "metadata": {"topic": "physics"},
            },
            {
                "id": "bread",
                "text": "Knead the dough, then bake the bread.",
                "metadata": {"topic": "cooking"},
            },
        ],
    )
    # min_generation: read your own write, even on a server that applies writes asynchronously.
    response = client.search(args.collection, "particle physics", top_k=2, min_generation=written.generation)
    for hit in response.hits:
        print(f"{hit.id:8} {hit.score:.3f}  {hit.text}")
