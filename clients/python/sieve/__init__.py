"""Sieve: Python client for the sieve.v1 gRPC search API.

The generated stubs live in `sieve.v1`; a hand-written facade comes on top of them.
"""
