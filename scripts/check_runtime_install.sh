#!/usr/bin/env bash
# The torch-free install, checked for real: the runtime alone (no training extra) into its own virtual
# environment (`pip install ".[cpu]"`: the core install with the CPU onnxruntime) must run `gi-deploy infer` (every bundle, int8 included when exported) and
# `gi-deploy evaluate` on the bundles the demo exported, and must not have pulled torch in.
# Prints the installed size of this environment next to the full one (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
demo=${1:-gi-deploy-demo}
venv=${RUNTIME_VENV:-.venv-runtime}
if [[ ! -d "$demo/deploy" ]]; then
  echo "no bundles under $demo/deploy: run \`gi-deploy demo\` first (the README's setup does)" >&2
  exit 1
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q ".[cpu]" -c constraints.txt
if "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "torch is importable in the runtime-only install: a core dependency pulled it in" >&2
  exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$venv/bin/gi-deploy" infer "$demo/data/capsule/test" --deploy "$demo/deploy" --source all --out "$out/pred.csv"
"$venv/bin/gi-deploy" evaluate "$out/pred.csv"
# --source auto (router + in-distribution check, numpy only) and evaluate --routing, torch-free too
"$venv/bin/gi-deploy" infer "$demo/data/mixed" --deploy "$demo/deploy" --source auto --out "$out/auto.csv"
grep -q ",1,out of distribution" "$out/auto.csv" || { echo "--source auto refused none of the OOD frames" >&2; exit 1; }
"$venv/bin/gi-deploy" evaluate --routing --deploy "$demo/deploy" --test "capsule=$demo/data/capsule/test" \
  --test "endoscope=$demo/data/endoscope/test" --ood "$demo/data/ood" --out "$out/routing"
for kind in metrics.json confusion.png roc.png; do  # pred.<kind>, or pred.<source>.<kind> with several sources
  compgen -G "$out/pred*.$kind" > /dev/null || { echo "evaluate wrote no pred*.$kind" >&2; exit 1; }
done
"$venv/bin/python" - "$out/pred.csv" <<'PY'
import sys
assert "torch" not in sys.modules
import gi_deploy.cli, gi_deploy.runtime.infer, gi_deploy.runtime.evaluate, gi_deploy.runtime.route  # noqa: F401
import gi_deploy.runtime.routing_eval  # noqa: F401
assert "torch" not in sys.modules, "a runtime module imported torch"
PY
size() { du -sm "$1/lib" | cut -f1; }
echo "installed size: runtime-only $venv $(size "$venv") MB; full .venv $( [[ -d .venv ]] && size .venv || echo '?') MB"
