#!/usr/bin/env bash
# The GPU speed and memory measurements of benchmarks/RESULTS.md, in one script for one GPU session:
# the PyTorch peer and lm at the same shape, then each switch on and off, then the shipped configs.
#
#   bash .whl/on-gpu.sh bash benchmarks/gpu_speed.sh [OUTPUT_DIR]     # default: $OUT, else gpu_results/
#
# Each run writes OUTPUT_DIR/<name>.json (benchmarks/throughput.py's fields) and its log; a run that
# fails (out of memory, say) leaves its log and the others go on. Most informative first, so a run
# cut short by the device's time limit still answers the main questions.
set -u
out=${1:-${OUT:-gpu_results}}
mkdir -p "$out"
timing=(--windows=3 --steps=10)
gpt2=(--config=configs/gpt2_124m.py --config.train.microbatches=1 --config.data.batch_size=32)

run() {  # name, then the command's arguments
  local name=$1
  shift
  echo "=== $name: $*"
  timeout 300 "$@" --json="$out/$name.json" > "$out/$name.log" 2>&1
  echo "exit $?"
  tail -8 "$out/$name.log"
}

run peer_gpt2_32rows python3 benchmarks/peers/torch_gpt2.py --n_layer=12 --n_head=12 --n_embd=768 --seq_len=1024 \
  --batch_size=32 --vocab_size=50304 --windows=3 --steps=10
run lm_gpt2_32rows_defaults python3 benchmarks/throughput.py "${gpt2[@]}" "${timing[@]}"
run lm_gpt2_32rows_unchunked_loss python3 benchmarks/throughput.py "${gpt2[@]}" "${timing[@]}" --config.model.loss_chunk_len=0
run lm_gpt2_32rows_unrolled_scan python3 benchmarks/throughput.py "${gpt2[@]}" "${timing[@]}" --config.model.scan_unroll=12
run lm_gpt2_32rows_unscanned python3 benchmarks/throughput.py "${gpt2[@]}" "${timing[@]}" --config.model.scan_layers=false
run lm_gpt2_32rows_fp8 python3 benchmarks/throughput.py "${gpt2[@]}" "${timing[@]}" --config.model.fp8_matmuls=true
run lm_gpt2_32rows_save_dots python3 benchmarks/throughput.py "${gpt2[@]}" "${timing[@]}" --config.model.remat_policy=save_dots
run lm_gpt2_as_shipped python3 benchmarks/throughput.py --config=configs/gpt2_124m.py --windows=2 --steps=3
run lm_llama_1b_4rows python3 benchmarks/throughput.py --config=configs/llama_1b.py --config.train.microbatches=1 \
  --config.data.batch_size=4 "${timing[@]}"
run lm_llama_1b_as_shipped python3 benchmarks/throughput.py --config=configs/llama_1b.py --windows=2 --steps=2
