#!/usr/bin/env bash
# What the load generator (python -m ranet.bench.serve) costs on this host: it runs against
# its own stub (a second process answering every request at once with a fixed prediction),
# so what it measures is the generator and the loopback, not a model. Reports, per rate,
# the generator's CPU ms per request, how far it fell behind its schedule, and the latency
# floor (p50/p99 from due time with a server that does nothing). About 1 minute.
#
#   scripts/serve_generator_cost.sh OUT_DIR [RATES] [more ranet.bench.serve flags]
#   e.g. scripts/serve_generator_cost.sh /tmp/gen 100,200,400,800,1600 --encoding=b64
#
# DATA_DIR (default ../shared/data) holds cifar-10-batches-py; PORT (default 8599) the stub's.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [RATES] [flags]}
rates=${2:-100,200,400,800,1600}
shift $(( $# >= 2 ? 2 : 1 ))
port=${PORT:-8599}
data_dir=${DATA_DIR:-../shared/data}
mkdir -p "$out"

python -m ranet.bench.serve --stub_port="$port" &
stub=$!
trap 'kill "$stub" 2>/dev/null || true' EXIT
until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.2; done

python -m ranet.bench.serve --url="http://127.0.0.1:$port" --model=stub \
    --data_dir="$data_dir" --images=2000 --rates="$rates" --duration=8 --warmup=2 \
    --slo_p99_ms=10 --json="$out/generator_cost.json" --plot="$out/generator_cost.png" "$@"
