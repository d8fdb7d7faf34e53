#!/usr/bin/env bash
# The Custos demo: a custodian, an enclave on the simulated platform and an end
# user, all on this machine, all through the real command-line tools.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK="$(mktemp -d -t custos-demo.XXXXXX)"
DATA="$WORK/custodian"
MODEL=bench/models/digits/digits.onnx
SAMPLES=bench/models/digits/samples
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
query() {  # query IMAGE — prints the result; a refusal is part of the demo, not a failure
    set +e
    run custos-query --enclave "$ENCLAVE" --manifest "$WORK/end-user.toml" "$1"
    local rc=$?
    set -e
    echo "(exit code $rc)"
}
wait_file() {
    for _ in $(seq 1 600); do [ -s "$1" ] && return 0; sleep 0.1; done
    echo "timed out waiting for $1" >&2
    exit 1
}
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

export CUSTODIAN_DATA="$DATA"
ENROL_PORT="$(free_port)"
GATEWAY_PORT="$(free_port)"

say "Custodian: start the server (creates its CA, key-encryption key and ledger in $DATA)"
custodian serve --data "$DATA" --listen "127.0.0.1:$ENROL_PORT" --mtls-listen "127.0.0.1:$GATEWAY_PORT" \
    >"$WORK/custodian.log" 2>&1 &
PIDS+=($!)
wait_file "$DATA/endpoints.json"
run custodian ca > "$WORK/custodian-ca.pem"

say "Custodian: add the model (encrypted at rest; the plaintext file is not kept)"
run custodian model add "$MODEL" --name digits
run custodian model list

say "Borrower: describe the enclave build (reference values for the simulated platform)"
run enclave manifest --platform sim --custodian-ca "$WORK/custodian-ca.pem" --out "$WORK/enclave.toml"

say "Custodian: approve that manifest for a deployment and grant 3 inferences"
TOKEN="$(custodian deployment create demo --model digits --manifest "$WORK/enclave.toml" --offline-grace 30 --json \
    | python -c 'import json,sys; print(json.load(sys.stdin)["join_token"])')"
echo "join token issued to the borrower (not shown)"
run custodian grant demo 3
run custodian deployment manifest demo --out "$WORK/end-user.toml"

say "Borrower: start the enclave (it enrols, receives the encrypted model, serves attested TLS)"
ENCLAVE_TOKEN="$TOKEN" enclave serve --custodian "127.0.0.1:$ENROL_PORT" --custodian-ca "$WORK/custodian-ca.pem" \
    --deployment demo --listen 127.0.0.1:0 --platform sim \
    --ready-file "$WORK/enclave.json" >"$WORK/enclave.log" 2>&1 &
PIDS+=($!)
wait_file "$WORK/enclave.json"
ENCLAVE="$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["inference"])' "$WORK/enclave.json")"
run custodian enclaves

say "End user: verify the enclave against the manifest, then classify a digit"
query "$SAMPLES/digit-3.png"
say "Quota goes down with each query"
query "$SAMPLES/digit-7.png"
query "$SAMPLES/digit-0.png"
sleep 1
run custodian usage demo

say "The quota is spent: the enclave itself refuses"
query "$SAMPLES/digit-5.png"

say "Custodian grants 2 more"
run custodian grant demo 2
query "$SAMPLES/digit-5.png"

say "Kill switch: suspend, and the enclave refuses at once"
run custodian suspend demo
sleep 0.5
query "$SAMPLES/digit-9.png"

say "Resume, and it serves again"
run custodian resume demo
sleep 0.5
query "$SAMPLES/digit-9.png"

say "Final usage"
sleep 1
run custodian usage demo
