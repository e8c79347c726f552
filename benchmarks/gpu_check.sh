#!/usr/bin/env bash
# The prepared GPU check (issue 22), at most 8 minutes on one 80 GB GPU: STDiT-XL/2 training
# under each engine, one sampled video, the tiny LLaVA captioning a batch; one JSON file.
#
#   benchmarks/gpu_check.sh [OUT.json]            # on a fresh GPU machine: sets up, then checks
#   benchmarks/gpu_check.sh --cpu-dry [OUT.json]  # the same code path at tiny sizes on the CPU
#
# OUT.json defaults to $OUT/gpu_check.json (or ./gpu_check.json). The colossalai engine joins
# when its environment builds within 3 minutes (it pins torch 2.5.1: a large download).
# benchmarks/gpu_check.py says what each part measures.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=()
if [[ "${1:-}" == --cpu-dry ]]; then
  dry=(--cpu-dry)
  shift
fi
out="${1:-${OUT:-.}/gpu_check.json}"
engines=(ddp fsdp)
if [[ ${#dry[@]} -eq 0 ]]; then
  make setup
  if timeout 180 make .venv-colossalai/.installed; then
    engines+=(colossalai)
  else
    echo "gpu_check: the colossalai environment did not build in 3 minutes; checking ddp and fsdp" >&2
  fi
fi
exec .venv/bin/python benchmarks/gpu_check.py "${dry[@]}" --engines "${engines[@]}" --out "$out"
