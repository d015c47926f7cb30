#!/usr/bin/env bash
# The front door on a machine with many cores: 1, 2, 4 and 8 server processes on one port, the
# same scenarios as `python -m benchmarks.frontdoor` (burst 64 at 0.1 ms steps, paced 4,000 x 10
# tokens/s), three runs each, interleaved, with several client processes so that the load client
# is not what is measured (one client core writes ~100k SSE events/s).
#
# Prepared for a 16-core machine (benchmarks/README.md, "Several server processes"); not run on
# the 2-core one. From the repository root, after `make venv`:
#
#   benchmarks/frontdoor_many.sh                  # 1,2,4,8 servers, 3 runs, 4 client processes
#   SERVERS=1,2,4 RUNS=1 benchmarks/frontdoor_many.sh
#
# Writes benchmarks/results/frontdoor-many.json and prints the Markdown table. Targets where cores
# are free: events/s >= 1.8x at 2 servers and >= 3.4x at 4; paced 4,000 x 10 p99 <= 100 ms.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVERS="${SERVERS:-1,2,4,8}"
RUNS="${RUNS:-3}"
CLIENTS="${CLIENTS:-4}"
PYTHON="${PYTHON:-.venv/bin/python}"

echo "cores: $(nproc); servers: ${SERVERS}; runs: ${RUNS}; client processes: ${CLIENTS}" >&2
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true  # 4,000 streams are 4,000 sockets in the clients and the servers

exec "${PYTHON}" -m benchmarks.frontdoor \
    --servers "${SERVERS}" \
    --runs "${RUNS}" \
    --clients "${CLIENTS}" \
    --json benchmarks/results/frontdoor-many.json
