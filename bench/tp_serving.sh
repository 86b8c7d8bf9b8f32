#!/usr/bin/env bash
# Served tensor-parallel comparison (docs/tensor-parallel.md): S-LoRA's S4 setting — Llama-2-13B shape, bf16,
# adapters of ranks 16/32/64 on q,k,v,o, power-law popularity alpha=1, gamma arrivals cv=1, lengths 8..512,
# 6 s first-token SLO, --num-pages 0 --max-num-seqs 256 --max-batch-tokens 4096 — the same trace (seed 0)
# against one server per tensor-parallel size, all rows in one JSON, each row with `tensor_parallel_size`.
#   bash bench/tp_serving.sh OUT.json
# Default rows: tp=1 n=100,1000; tp=2 n=100,1000, then tp=2 without LoRA (lorafleet-nolora, on the warmed
# server). Each server is warmed before its first measured row by an unmeasured WARMUP-second run (default 20;
# `lorafleet bench --warmup-duration`, the same rate at the largest n; its figures go to the JSON's `warmups`), so
# Triton compilation, graph capture and the first adapter reads do not land in the first row of one size only.
# Each server's log (its --log-steps lines) is written beside OUT.json as OUT-tp<N>-steps.log.
# BUDGET (s, default 500) bounds the whole script: the bench of the running server is stopped cleanly
# (rows done are kept) so that one command fits a 9-minute limit; DURATION=30 s per row (S-LoRA used 60 s,
# the issue 50 s) keeps five rows and two server start-ups inside it on two H200s.
# Environment: RATE (req/s offered), DURATION, WARMUP, DRAIN, BUDGET, SHAPE, DEVICE, DTYPE, TPS (sizes, in order),
# LORAFLEET_N (adapter counts), NOLORA_TP (the size that also runs the no-LoRA row; empty = none), RANKS,
# TARGETS, HOST_CACHE_MB. `SHAPE=tiny DEVICE=cpu DTYPE=float32 RATE=2 DURATION=4 LORAFLEET_N=2 RANKS=3,5
# NUM_PAGES=512` is a CPU smoke run of the script (gloo ranks). APPEND=1 adds to an existing OUT.json.
set -euo pipefail
out=${1:?results json}
SHAPE=${SHAPE:-llama-2-13b}
TPS=${TPS:-1,2}
counts=${LORAFLEET_N:-100,1000}
NOLORA_TP=${NOLORA_TP-2}
deadline=$(( $(date +%s) + ${BUDGET:-500} ))
max_n=$(tr ',' '\n' <<<"$counts" | sort -n | tail -1)
mkdir -p "$(dirname "$out")"
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
[ -n "${APPEND:-}" ] || rm -f "$out"  # APPEND=1: add rows to an existing OUT.json
work=$(mktemp -d "${TMPDIR:-/tmp}/lorafleet-tp-serving.XXXXXX")
trap 'rm -rf "$work"' EXIT
model=${MODEL_DIR:-$work/model}
python3 -c "from lorafleet.engine.synthetic import write_model; write_model('$SHAPE', '$model')"
S=(--device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --num-pages "${NUM_PAGES:-0}" --max-num-seqs 256
   --max-batch-tokens 4096 --max-adapters-per-batch 256 --host-cache-mb "${HOST_CACHE_MB:-16384}" --max-queue 8192
   --synthetic-adapters "$max_n" --synthetic-ranks "${RANKS:-16,32,64}"
   --synthetic-targets "${TARGETS:-q_proj,k_proj,v_proj,o_proj}" --log-steps 10)
W=(--alpha 1 --cv 1 --input-len 8:512 --output-len 8:512 --rate "${RATE:-30}" --duration "${DURATION:-30}" --seed 0
   --slo-ttft-ms 6000 --drain-timeout "${DRAIN:-15}" --protocol ws --num-sockets 4 --no-progress
   --startup-timeout 300 --warmup-duration "${WARMUP:-20}" --model "$model" --out "$out" --append)
rows_of() {  # a server of size $1: its start-up (about one row's time), its warm-up, one row per count, no-LoRA
  local n; n=$(( $(tr ',' '\n' <<<"$counts" | grep -c .) + 1 ))
  [ "${WARMUP:-20}" = 0 ] || n=$((n + 1))  # the warm-up run and its drain: about one more row
  [ "$1" = "$NOLORA_TP" ] && n=$((n + 1))
  echo "$n"
}
rows_left=0
for tp in ${TPS//,/ }; do rows_left=$((rows_left + $(rows_of "$tp"))); done
status=0
for tp in ${TPS//,/ }; do
  # the budget left, shared by rows and start-ups: a slow first server cannot eat the next one's time
  rows=$(rows_of "$tp")
  left=$(( (deadline - $(date +%s)) * rows / rows_left ))
  rows_left=$((rows_left - rows))
  if [ "$left" -le 30 ]; then echo "budget spent before tp=$tp" >&2; status=124; continue; fi
  backends=lorafleet
  [ "$tp" = "$NOLORA_TP" ] && backends=lorafleet,lorafleet-nolora
  code=0
  timeout -s INT "$left" lorafleet bench --backend "$backends" --num-adapters "$counts" \
      --nolora-num-adapters "${counts%%,*}" "${S[@]/#/--serve-arg=}" "--serve-arg=--tensor-parallel-size=$tp" \
      "${W[@]}" --log-dir "$work/logs-tp$tp" || code=$?
  cp "$work/logs-tp$tp/lorafleet.log" "${out%.json}-tp$tp-steps.log" 2>/dev/null || true
  [ "$code" -eq 0 ] || { echo "tp=$tp: lorafleet bench exited with $code (rows done are kept)" >&2; status=$code; }
done
exit "$status"
