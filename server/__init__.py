"""The Sieve gRPC server: transport (servicers, app), core (engine), store and index."""
