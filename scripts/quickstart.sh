#!/usr/bin/env bash
# The main job end to end, with nothing to download: build a small random-weight Llama,
# calibrate it with GlowQ, serve it with `vllm serve --quantization glowq` (through the same
# entrypoint and arguments as the container image), send one chat request with the openai
# client, and stop the server.   Usage: bash scripts/quickstart.sh [WORK_DIR]
# The first run installs into .venv (about 3.7 GB, 7-10 minutes on a CPU machine); later runs
# only check it. Every step says what it does as it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "quickstart: [1/4] installing (scripts/install.sh; the first run downloads about 3.7 GB) ..."
bash scripts/install.sh
. .venv/bin/activate
work=${1:-out/quickstart}
port=${GLOWQ_PORT:-8765}
mkdir -p "$work"

echo "quickstart: [2/4] calibrating a small random Llama into $work/glowq ..."
[ -f "$work/source/config.json" ] || python -m offline_calibrate.tiny "$work/source"
glowq-calibrate "$work/source" --output "$work/glowq" --overwrite \
  --group-size 32 --rank 16 --samples 8 --seq-len 256 --dataset random

if ! command -v nvidia-smi >/dev/null; then
  # vLLM on the CPU: KV-cache size in GiB (vLLM's CPU backend reads it from the environment).
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
fi
GLOWQ_SERVE_ARGS_FILE=deploy/serve-args.txt setsid deploy/bin/glowq-serve "$work/glowq" \
  --host 127.0.0.1 --port "$port" --max-model-len 1024 >"$work/server.log" 2>&1 &
server=$!
trap 'kill -- -$server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
echo "quickstart: [3/4] starting vllm serve $work/glowq on 127.0.0.1:$port (about a minute; log: $work/server.log) ..."
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 $server 2>/dev/null || { tail -20 "$work/server.log"; exit 1; }
  sleep 1
done
echo "quickstart: [4/4] one chat request with the openai client ..."
python - "$port" <<'PY'
import sys
from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused")
reply = client.chat.completions.create(
    model="glowq", messages=[{"role": "user", "content": "Hello!"}], max_tokens=16, temperature=0
)
print("model:", reply.model)
print("reply:", repr(reply.choices[0].message.content), f"({reply.usage.completion_tokens} tokens)")
PY
echo "quickstart OK (random weights, so the reply is gibberish; calibrate a real model the same way)"
