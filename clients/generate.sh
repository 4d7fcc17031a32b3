#!/usr/bin/env bash
# Regenerates every client from proto/ with tools from the registries only:
#   TypeScript: buf (npm @bufbuild/buf, root package.json) + protoc-gen-es (npm, clients/typescript)
#   Python:     grpcio-tools (PyPI, pinned in clients/python/requirements-dev.txt), with .pyi stubs
# The output is committed; CI runs this and fails if it changes anything (`--check`).
set -euo pipefail
cd "$(dirname "$0")/.."

check=false
[ "${1:-}" = "--check" ] && check=true

# Node tools from the lock files (quiet no-ops when node_modules is current).
[ -x node_modules/.bin/buf ] || npm ci --no-audit --no-fund
[ -x clients/typescript/node_modules/.bin/protoc-gen-es ] || (cd clients/typescript && npm ci --no-audit --no-fund)

echo "== TypeScript (protoc-gen-es)"
npx --no-install buf generate

echo "== Python (grpcio-tools)"
PY_VENV="${CHAT_PY_VENV:-clients/python/.venv}"
. clients/python/venv.sh "$PY_VENV"
PY_OUT=clients/python/src/chat_service_client
rm -rf "$PY_OUT/chat"
mkdir -p "$PY_OUT"
"$PY_VENV/bin/python" -m grpc_tools.protoc -Iproto \
  --python_out="$PY_OUT" --pyi_out="$PY_OUT" --grpc_python_out="$PY_OUT" \
  proto/chat/v1/*.proto
# protoc writes imports relative to the proto root (`from chat.v1 import ...`); inside the
# package they must name it.
find "$PY_OUT/chat" -name '*.py' -o -name '*.pyi' | sort | while read -r f; do
  sed -i -E 's/^from chat\.v1 import /from chat_service_client.chat.v1 import /' "$f"
done
touch "$PY_OUT/chat/__init__.py" "$PY_OUT/chat/v1/__init__.py"

if $check; then
  # Untracked or changed files under clients/ mean the committed code is stale.
  if [ -n "$(git status --porcelain -- clients/typescript/src/gen "$PY_OUT/chat")" ]; then
    git status --porcelain -- clients/typescript/src/gen "$PY_OUT/chat" >&2
    git --no-pager diff --stat -- clients/ >&2
    echo "error: generated clients differ from proto/; run clients/generate.sh and commit" >&2
    exit 1
  fi
  echo "generated clients match proto/"
fi
