#!/usr/bin/env bash
# The kernel table of issue 23 (item 5) on a many-core server, as one command for the device tool, after
# benchmarks/device/prepare.sh here:
#     run(command="bash benchmarks/device/kernel_table.sh", carry=[".whl"], timeout_s=600)
# Installs the carried OpenVINO wheel, builds the op (the ONNX Runtime library only where the machine has its
# headers), and writes to $OUT, each stage within its own time limit so that a slow one still leaves the others:
# lscpu.txt, build.log, kernel_core.json (the core alone at 1, 4, 8 and 16 threads, sparsity 0 / 0.5 / 0.9),
# kernel_openvino.json (against the plugin's FullyConnected) and op_call_cost.json (the fixed cost of a call with
# every channel pruned, on SmolLM2's and TinyLlama's shapes, at the fewest and most threads), each stage's stderr
# beside it. THREADS, SHAPES and the limits CORE_S / OV_S / CALL_S (seconds) override the defaults.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
THREADS=${THREADS:-1 4 8 16}
SHAPES=${SHAPES:-4096x11008 11008x4096 4096x4096 2048x5632}
root=$PWD
site=$(mktemp -d)
build=$(mktemp -d)
if ! python3 -c "import openvino" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
fi
export PYTHONPATH="$site:$root/src" PYTHONUNBUFFERED=1
lscpu > "$OUT/lscpu.txt"
{ cmake -S . -B "$build" -DPython_EXECUTABLE="$(command -v python3)" && cmake --build "$build" -j"$(nproc)"; } \
  > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
export ACTSPARSE_EXT_DIR="$build/lib" ACTSPARSE_REQUIRE_EXTENSION=1
cd benchmarks
# shellcheck disable=SC2086
timeout "${CORE_S:-150}" python3 kernel_core_bench.py --threads $THREADS --shapes $SHAPES --formats bf16 u8 u4 \
  --output "$OUT/kernel_core.json" 2> "$OUT/kernel_core.log"
echo "kernel_core_bench: exit $?"
# shellcheck disable=SC2086
timeout "${OV_S:-240}" python3 kernel_bench.py --threads $THREADS --shapes $SHAPES --formats bf16 int8 int4 \
  --rounds 3 --output "$OUT/kernel_openvino.json" 2> "$OUT/kernel_openvino.log"
echo "kernel_bench: exit $?"
# shellcheck disable=SC2086
timeout "${CALL_S:-90}" python3 op_call_cost.py --threads $(echo $THREADS | awk '{print $1, $NF}') --formats bf16 int8 \
  --rounds 6 --output "$OUT/op_call_cost.json" 2> "$OUT/op_call_cost.log"
echo "op_call_cost: exit $?"
ls -la "$OUT"
