#!/usr/bin/env bash
# The main job on the embedded default, end to end, on a fresh machine (no Redis, no Docker):
# install -> `excb up` (API + worker + embed + dashboard, SQLite + embedded Celery transport) ->
# submit a real ExCB job on digits -> it trains, exports to ONNX, passes the parity check, registers ->
# embed an image with the new model -> show its live balance. KEEP=1 leaves the stack running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PORT="${PORT:-8000}"
HOME_DIR="${EXCB_DEMO_HOME:-.excb-demo}"
export EXCB_API_URL="http://127.0.0.1:${PORT}"
unset EXCB_REDIS_URL EXCB_DATABASE_URL
mkdir -p "$HOME_DIR"
.venv/bin/excb up --home "$HOME_DIR" --port "$PORT" > "$HOME_DIR/up.log" 2>&1 &
UP_PID=$!
cleanup() { [ "${KEEP:-0}" = 1 ] || { kill "$UP_PID" 2>/dev/null || true; wait "$UP_PID" 2>/dev/null || true; }; }
trap cleanup EXIT
for _ in $(seq 1 120); do
  curl -fsS "$EXCB_API_URL/livez" >/dev/null 2>&1 && break
  kill -0 "$UP_PID" 2>/dev/null || { cat "$HOME_DIR/up.log"; exit 1; }
  sleep 1
done
echo "excb up is running: $EXCB_API_URL (dashboard: $EXCB_API_URL/dashboard)"
OUT=$(.venv/bin/excb jobs --json submit examples/digits-job.yaml)
JOB=$(printf '%s' "$OUT" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "submitted job $JOB — following its log"
.venv/bin/excb jobs logs "$JOB" --follow || true
.venv/bin/excb jobs status "$JOB"
STATUS=$(.venv/bin/excb jobs --json status "$JOB" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["status"])')
[ "$STATUS" = SUCCEEDED ] || { echo "job ended $STATUS"; exit 1; }
# Wait until the embed service has loaded the new model, then embed one digit image.
.venv/bin/python - "$EXCB_API_URL" <<'PY'
import io, json, sys, time, urllib.request
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

url = sys.argv[1]
img = Image.fromarray((load_digits().images[0] * 16).astype("uint8")).resize((28, 28))
buf = io.BytesIO(); img.save(buf, format="PNG")
boundary = "excbdemo"
body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"digit.png\"\r\n"
        f"Content-Type: image/png\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()
for _ in range(60):
    req = urllib.request.Request(f"{url}/v1/embed", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        out = json.load(urllib.request.urlopen(req, timeout=30))
        break
    except urllib.error.HTTPError as exc:
        if exc.code not in (503, 404):
            raise
        time.sleep(2)
else:
    sys.exit("the embed service never loaded the model")
d = out["data"][0]
print(f"embedded with {out['model_version']}: {len(d['embedding'])}-d embedding, cluster {d['cluster']['id']} "
      f"(similarity {d['cluster']['similarity']:.3f})")
bal = json.load(urllib.request.urlopen(f"{url}/v1/models/latest/balance"))
print(f"served balance: {bal['assignments']} assignment(s) in the window (size {bal['window']}), "
      f"drift from the training sizes TV={bal['drift']['tv']:.3f} (few requests -> large drift)")
PY
echo "done. dashboard: $EXCB_API_URL/dashboard  (KEEP=1 $0 to leave the stack running)"
