#!/usr/bin/env bash
# Make sure redis-server is on this machine (Debian's package). Used by `make run` and `make test`
# when no SIEVE_REDIS_URL points at an existing Redis. The same binary runs Redis Sentinel
# (`redis-server sentinel.conf --sentinel`, as tests/integration/test_sentinel.py starts it), so no
# redis-sentinel package is needed.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "redis-server is missing: install Debian's redis-server package (or set SIEVE_REDIS_URL)" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
echo "installing redis-server (apt)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
# The package starts a system service on 6379 where an init system runs; Sieve starts its own.
command -v redis-server
