#!/usr/bin/env bash
# The CPU thread policy under light load: the default `lorafleet serve` (demo model; executor threads
# chosen from the usable cores) against the same server with every executor at one torch thread per core
# (`--torch-threads $(nproc)`, PyTorch's own default before the policy). Same loadgen workload each time
# (rate 6 req/s, short prompts and outputs, 20 s), written to one JSON per setting under OUT_DIR.
#   bash bench/thread_policy.sh bench/results/thread-policy-cpu
set -euo pipefail
out=${1:?output directory}
mkdir -p "$out"
cores=$(nproc)
run() {  # name, serve flags...
  local name=$1; shift
  local log="$out/$name-serve.log" port
  lorafleet serve --port 0 "$@" > "$log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do grep -q "ready on" "$log" && break; sleep 0.2; done
  port=$(grep -o "ready on http://[^ ]*" "$log" | head -1 | sed 's/ready on //')
  lorafleet loadgen --url "$port" --rate 6 --duration 20 --input-len 4:12 --output-len 4:12 --seed 0 \
      --no-progress --out "$out/$name.json" || true
  kill "$pid"; wait "$pid" || true
}
run policy
run torch-default --torch-threads "$cores"
python3 - "$out" "$cores" <<'EOF'
import json, sys, pathlib
out, cores = pathlib.Path(sys.argv[1]), int(sys.argv[2])
rows = {}
for name in ("policy", "torch-default"):
    m = json.loads((out / f"{name}.json").read_text())["metrics"]
    rows[name] = {k: m[k] for k in ("num_requests", "completed", "failed", "errors_by_code")}
    rows[name].update(ttft_mean_ms=1e3 * (m["ttft_s"]["mean"] or 0), ttft_p99_ms=1e3 * (m["ttft_s"]["p99"] or 0),
                      e2e_mean_ms=1e3 * (m["e2e_s"]["mean"] or 0), slo_attainment=m["slo_attainment"])
summary = {"command": "bash bench/thread_policy.sh " + str(out), "usable_cores": cores, "rows": rows}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
