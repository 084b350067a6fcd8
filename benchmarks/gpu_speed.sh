#!/usr/bin/env bash
# The GPU speed and memory measurements of benchmarks/RESULTS.md, in one script for one GPU session:
# the PyTorch peer and lm at the same shape, then each switch on and off, the shipped configs, and
# the largest Llama that trains with AdamW on one GPU.
#
#   bash .whl/on-gpu.sh bash benchmarks/gpu_speed.sh [OUTPUT_DIR] [SECONDS]
#     OUTPUT_DIR: default $OUT, else gpu_results/; SECONDS: start no run after this many (default 480)
#   ONLY="name name ..." runs only the runs so named, in this file's order.
#
# Each run writes <name>.json (benchmarks/throughput.py's fields) and its log into OUTPUT_DIR/runs/,
# packed after each run into OUTPUT_DIR/runs.tar.gz (with the default run's profile as
# OUTPUT_DIR/gpt2_defaults.xplane.pb); a run that fails (out of memory, say) leaves its log and the
# others go on. Most informative first, so a
# session cut short by the device's time limit still answers the main questions; a table of every
# run ends the output.
set -u
results=${1:-${OUT:-gpu_results}}
out=$results/runs
budget=${2:-480}
deadline=$((SECONDS + budget))
mkdir -p "$out"
short=(--warmup=2 --windows=3 --steps=5)
gpt2=(--config=configs/gpt2_124m.py --config.train.microbatches=1 --config.data.batch_size=32)
llama_1b=(--config=configs/llama_1b.py --config.train.microbatches=1 --config.data.batch_size=4)
# Llama 3.2 3B's widths with 36 blocks: 4.0B parameters, float32 with AdamW (16 bytes a parameter).
llama_4b=(--config=configs/llama_1b.py --config.train.microbatches=1 --config.data.batch_size=1
  --config.model.num_layers=36 --config.model.embed_dim=3072 --config.model.num_heads=24
  --config.model.num_kv_heads=8 --config.model.mlp_dim=8192 --config.model.remat_policy=full)

run() {  # name, then the command's arguments
  local name=$1 left=$((deadline - SECONDS))
  shift
  if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then
    return
  fi
  if ((left < 45)); then
    echo "=== $name: skipped (out of time)"
    return
  fi
  echo "=== $name: $*"
  timeout $((left < 150 ? left : 150)) "$@" --json="$out/$name.json" > "$out/$name.log" 2>&1
  echo "exit $? at ${SECONDS}s"
  grep -E "step time|tokens/s|MFU \(causal\)|peak memory|warmup|Error|error:" "$out/$name.log" | tail -6
  tar -czf "$results/runs.tar.gz" -C "$results" runs
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
run peer_gpt2_32rows python3 benchmarks/peers/torch_gpt2.py --n_layer=12 --n_head=12 --n_embd=768 --seq_len=1024 \
  --batch_size=32 --vocab_size=50304 --windows=3 --steps=5
run lm_gpt2_32rows_defaults python3 benchmarks/throughput.py "${gpt2[@]}" "${short[@]}" --trace_dir=/tmp/trace
cp /tmp/trace/plugins/profile/*/*.xplane.pb "$results/gpt2_defaults.xplane.pb" 2>/dev/null
run lm_gpt2_32rows_unrolled_scan python3 benchmarks/throughput.py "${gpt2[@]}" "${short[@]}" --config.model.scan_unroll=12
run lm_gpt2_as_shipped python3 benchmarks/throughput.py --config=configs/gpt2_124m.py --warmup=1 --windows=2 --steps=1
run lm_llama_1b_4rows python3 benchmarks/throughput.py "${llama_1b[@]}" "${short[@]}"
run lm_llama_4b_1row_remat env XLA_PYTHON_CLIENT_MEM_FRACTION=0.97 python3 benchmarks/throughput.py "${llama_4b[@]}" \
  --warmup=2 --windows=2 --steps=3
run lm_gpt2_32rows_unscanned python3 benchmarks/throughput.py "${gpt2[@]}" "${short[@]}" --config.model.scan_layers=false
run lm_gpt2_32rows_unrolled_save_dots python3 benchmarks/throughput.py "${gpt2[@]}" "${short[@]}" \
  --config.model.scan_unroll=12 --config.model.remat_policy=save_dots
run lm_gpt2_32rows_fp8 python3 benchmarks/throughput.py "${gpt2[@]}" "${short[@]}" --config.model.fp8_matmuls=true
run lm_gpt2_64rows_unrolled python3 benchmarks/throughput.py "${gpt2[@]}" "${short[@]}" --config.data.batch_size=64 \
  --config.model.scan_unroll=12
run lm_llama_1b_4rows_unrolled python3 benchmarks/throughput.py "${llama_1b[@]}" "${short[@]}" --config.model.scan_unroll=16
run lm_gpt2_32rows_unchunked_loss python3 benchmarks/throughput.py "${gpt2[@]}" "${short[@]}" --config.model.loss_chunk_len=0
run lm_llama_1b_as_shipped python3 benchmarks/throughput.py --config=configs/llama_1b.py --warmup=1 --windows=1 --steps=1
run lm_gpt2_350m_as_shipped python3 benchmarks/throughput.py --config=configs/gpt2_350m.py --warmup=1 --windows=1 --steps=1

python3 - "$out" <<'EOF'
import glob, json, os, sys
if not glob.glob(os.path.join(sys.argv[1], "*.json")): sys.exit()
print(f"{'run':<36}{'step ms':>9}{'tok/s':>10}{'MFU':>7}{'GiB':>7}{'warmup s':>10}")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")), key=os.path.getmtime):
  r = json.load(open(path))
  print(f"{os.path.basename(path)[:-5]:<36}{r['step_seconds'] * 1e3:>9.1f}{r['tokens_per_second_per_device']:>10,.0f}"
        f"{100 * r.get('mfu', 0):>6.1f}%{(r.get('peak_memory_bytes') or 0) / 2**30:>7.1f}{r.get('warmup_seconds', 0):>10.1f}")
EOF
