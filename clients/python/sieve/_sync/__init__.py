"""The blocking client's parts: the plumbing every call goes through (base.py) and one class of calls per
service. `sieve.client.SieveClient` puts them together; scripts/gen_async_client.py writes their asyncio
twins into sieve/_async from these files (edit here, then rerun it)."""
