"""Sieve core: code shared by the server and the workers (config, errors, model runners)."""
