#!/usr/bin/env bash
# Train the demand forecaster and write models/lstm.onnx, models/lstm.json,
# models/fixtures/features.json, models/MODEL_CARD.md (and models/build/dataset-*.json), then the
# broken-model fixtures (models/train/bad_models.py).
# Traces: $SHADOWCDN_TRACES, default <repo>/../shared/traces. Extra arguments go to train.py.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$REPO"

TRACES="${SHADOWCDN_TRACES:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/traces}"
for f in elastic_apache_logs/apache_logs nasa_lpdaac_opendap/logs_for_opendap.txt.gz; do
  if [ ! -f "$TRACES/$f" ]; then
    echo "train.sh: trace file missing: $TRACES/$f" >&2
    echo "train.sh: put the shared traces at <repo>/../shared/traces or set SHADOWCDN_TRACES" >&2
    exit 2
  fi
done

VENV="$REPO/models/train/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q -r models/train/requirements.txt

"$VENV/bin/python" models/train/train.py "$TRACES" "$@"
# The broken-model fixtures of the reload tests are derived from the model just written.
exec "$VENV/bin/python" models/train/bad_models.py
