#!/usr/bin/env bash
# S-LoRA's S6 setting on four GPUs (issue #14): Llama-2-70B shape (synthetic:llama-2-70b, each rank makes only
# its own shard of the random weights), bf16, tensor-parallel size 4, adapters of rank 64 on q,k,v,o, n = 100
# and 1000, then no LoRA on the warmed server; alpha=1, cv=1, lengths 8..512, a rate above capacity, 50 s per
# row, 6 s first-token SLO. One JSON with `tensor_parallel_size` in every row, and the server's step log.
#   bash bench/tp4_70b.sh bench/results/tp4-70b-h200x4.json
# Written for `nvidia-h200-x4`; not yet run (that machine kind was withheld). Fits one 9-minute command
# (BUDGET 530 s); the environment of bench/tp_serving.sh applies.
set -euo pipefail
out=${1:-bench/results/tp4-70b-h200x4.json}
SHAPE=${SHAPE:-llama-2-70b} TPS=${TPS:-4} NOLORA_TP=${NOLORA_TP-4} RANKS=${RANKS:-64} \
  LORAFLEET_N=${LORAFLEET_N:-100,1000} RATE=${RATE:-30} DURATION=${DURATION:-50} DRAIN=${DRAIN:-20} \
  BUDGET=${BUDGET:-530} exec bash "$(dirname "$0")/tp_serving.sh" "$out"
