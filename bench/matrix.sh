#!/usr/bin/env bash
# The throughput matrix of docs/benchmarks.md: one lorafleet server per model, every row measured against it
# (the no-LoRA row last, on the server the LoRA rows warmed), S-LoRA's workload: alpha=1, cv=1, lengths 8..512,
# ranks 8/16/32/64, 6 s first-token SLO, RATE req/s offered (above capacity).
#   bash bench/matrix.sh llama-2-7b OUT_DIR   # q/k/v/o adapters (S-LoRA S2): n=100,1000,2000, then no-LoRA
#   bash bench/matrix.sh llama-3-8b OUT_DIR   # all seven targets: n=100,1000, then no-LoRA
# Writes OUT_DIR/matrix-llama-2-7b-h200.json or OUT_DIR/matrix-llama-3-8b-all-h200.json (the S-LoRA table's
# `rows` schema: backend, num_adapters, req_per_s, ... plus the server's adapter load figures and, per batch
# size class, the executor time beside the step roofline) and OUT_DIR/<same name>-steps.log (the server log
# with its --log-steps lines). One model's matrix fits one 9-minute command with DURATION=40 s per row (the
# S-LoRA table used 60 s); BUDGET (s) stops the bench cleanly before that, keeping the rows done.
# The GPU is CUDA_VISIBLE_DEVICES's and the port a free one, so two models can run at once on two GPUs:
#   CUDA_VISIBLE_DEVICES=0 bash bench/matrix.sh llama-2-7b OUT & CUDA_VISIBLE_DEVICES=1 bash bench/matrix.sh llama-3-8b OUT
# `tiny` (DEVICE=cpu DTYPE=float32 NUM_PAGES=512 RATE=4 DURATION=8) is a smoke run of the script itself.
# Before the rows, a discarded WARMUP-second run (default 20) at the largest n compiles the kernels and captures
# the lazily captured CUDA graphs, so that the first row is not measured on a cold server.
# Environment: RATE, DURATION, WARMUP, BUDGET, DEVICE, DTYPE, NUM_PAGES, HOST_CACHE_MB, PREFETCH_WORKERS, MAX_LOAD_BYTES,
# BATCH_ADAPTER_FRACTION (distinct adapters' bytes per step / weight bytes; 0 = unbounded), CLUSTER_WINDOW, the rows:
# LORAFLEET_N (adapter counts), NOLORA_N (default: the first count; n only picks the trace's names).
set -euo pipefail
shape=${1:?llama-2-7b or llama-3-8b}
out_dir=${2:?output directory}
case "$shape" in
  llama-2-7b) name=matrix-llama-2-7b-h200; targets=q_proj,k_proj,v_proj,o_proj; counts=${LORAFLEET_N:-100,1000,2000} ;;
  llama-3-8b) name=matrix-llama-3-8b-all-h200
              targets=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; counts=${LORAFLEET_N:-100,1000} ;;
  tiny) name=matrix-tiny-cpu; targets=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj  # CPU smoke run
        counts=${LORAFLEET_N:-3,6} ;;
  *) echo "unknown model shape $shape (llama-2-7b or llama-3-8b)" >&2; exit 2 ;;
esac
max_n=$(tr ',' '\n' <<<"$counts" | sort -n | tail -1)
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/lorafleet-matrix-$shape.XXXXXX")
model=${MODEL_DIR:-$work/model}
python3 -c "from lorafleet.engine.synthetic import write_model; write_model('$shape', '$model')"
S=(--device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --num-pages "${NUM_PAGES:-0}" --max-num-seqs 256 --max-batch-tokens 4096
   --max-adapters-per-batch 256 --host-cache-mb "${HOST_CACHE_MB:-8192}" --max-queue 8192
   --synthetic-adapters "$max_n" --synthetic-targets "$targets" --log-steps 10
   --prefetch-workers "${PREFETCH_WORKERS:-4}" --prefetch-adapters 16
   --max-adapter-load-bytes-per-step "${MAX_LOAD_BYTES:-268435456}"
   --max-batch-adapter-fraction "${BATCH_ADAPTER_FRACTION:-0}" --cluster-window "${CLUSTER_WINDOW:-0}")
W=(--alpha 1 --cv 1 --input-len 8:512 --output-len 8:512 --rate "${RATE:-40}" --duration "${DURATION:-40}" --seed 0
   --slo-ttft-ms 6000 --drain-timeout 20 --protocol ws --num-sockets 4 --no-progress --startup-timeout 300
   --warmup-duration "${WARMUP:-20}"
   --model "$model" --out "$out_dir/$name.json" --log-dir "$work/logs")
status=0
timeout -s INT "${BUDGET:-530}" lorafleet bench --backend lorafleet,lorafleet-nolora --num-adapters "$counts" \
    --nolora-num-adapters "${NOLORA_N:-${counts%%,*}}" "${S[@]/#/--serve-arg=}" "${W[@]}" || status=$?
cp "$work/logs/lorafleet.log" "$out_dir/$name-steps.log" 2>/dev/null || true
rm -rf "$work"
exit "$status"
