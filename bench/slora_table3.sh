#!/usr/bin/env bash
# S-LoRA's table 3 setting (Llama-2-7B shape, ranks 8/16/32/64 on q,k,v,o, alpha=1, cv=1, lengths 8..512,
# 6 s first-token SLO) against lorafleet, lorafleet-nolora and HF PEFT, into one JSON.
#   bash bench/slora_table3.sh lorafleet OUT.json   # lorafleet n=5,100,1000,2000, then lorafleet-nolora n=100
#                                                   # (one server for all)
#   bash bench/slora_table3.sh peft OUT.json        # PEFT n=5,100 (as the paper)
# Each part fits a 10-minute command limit; the second appends to the first's file.
# Environment: RATE (req/s, above every backend's capacity), DURATION (s), SHAPE, DEVICE, LOGS, and the rows:
# BACKENDS, LORAFLEET_N, NOLORA_N, PEFT_N (adapter counts), MAX_N / PEFT_MAX_N (adapters each server holds).
set -euo pipefail
part=${1:?lorafleet or peft}
out=${2:?results json}
RATE=${RATE:-40}
DURATION=${DURATION:-60}
SHAPE=${SHAPE:-llama-2-7b}
DEVICE=${DEVICE:-cuda}
LOGS=${LOGS:-$(dirname "$out")/logs}
MAX_N=${MAX_N:-2000}
model=${MODEL_DIR:-${TMPDIR:-/tmp}/synth-$SHAPE}
python3 -c "from lorafleet.engine.synthetic import write_model; write_model('$SHAPE', '$model')"
W=(--alpha 1 --cv 1 --input-len 8:512 --output-len 8:512 --rate "$RATE" --duration "$DURATION" --seed 0
   --slo-ttft-ms 6000 --drain-timeout 30 --protocol ws --num-sockets 4 --no-progress --startup-timeout 300
   --model "$model" --out "$out" --append --log-dir "$LOGS")
if [ "$part" = lorafleet ]; then
  S=(--device "$DEVICE" --dtype bfloat16 --num-pages 0 --max-num-seqs 256 --max-batch-tokens 4096
     --max-adapters-per-batch 256 --host-cache-mb 65536 --max-queue 8192 --synthetic-adapters "$MAX_N"
     --log-steps 10)
  lorafleet bench --backend "${BACKENDS:-lorafleet,lorafleet-nolora}" --num-adapters "${LORAFLEET_N:-5,100,1000,2000}" \
      --nolora-num-adapters "${NOLORA_N:-100}" "${S[@]/#/--serve-arg=}" "${W[@]}"
elif [ "$part" = peft ]; then
  lorafleet bench --backend peft --peft-num-adapters "${PEFT_N:-5,100}" --peft-arg=--random-weights \
      --peft-arg=--device="$DEVICE" --peft-arg=--dtype=bfloat16 --peft-arg=--synthetic-adapters="${PEFT_MAX_N:-100}" "${W[@]}"
else
  echo "unknown part $part" >&2; exit 2
fi
