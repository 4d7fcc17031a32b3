# Sourced by clients/generate.sh and scripts/test: makes the virtualenv named in $1 (default
# clients/python/.venv) from the pinned requirements-dev.txt, reusing it while the pins are
# unchanged.
_venv="${1:-clients/python/.venv}"
_req="$(dirname "${BASH_SOURCE[0]}")/requirements-dev.txt"
if [ ! -x "$_venv/bin/python" ] || ! cmp -s "$_req" "$_venv/requirements-dev.txt"; then
  # The marker is written only after a complete install, so a failed one is redone next time.
  rm -f "$_venv/requirements-dev.txt"
  python3 -m venv "$_venv" \
    && "$_venv/bin/pip" install -q --disable-pip-version-check -r "$_req" \
    && cp "$_req" "$_venv/requirements-dev.txt"
fi
unset _venv _req
