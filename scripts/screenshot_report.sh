#!/usr/bin/env bash
# Screenshot a report page with headless Chromium: scripts/screenshot_report.sh REPORT.html OUT.png
# The page is self-contained; the flags keep Chromium off the network and out of ~/.config.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 REPORT.html OUT.png" >&2
    exit 2
fi
report=$1
out=$2
chromium=${CHROMIUM:-/usr/bin/chromium}
if [[ ! -x $chromium ]]; then
    echo "error: $chromium not found; install it with: apt-get install chromium" >&2
    exit 1
fi
if [[ ! -f $report ]]; then
    echo "error: $report: no such file" >&2
    exit 1
fi
report_abs=$(realpath "$report")
out_abs=$(realpath -m "$out")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT

"$chromium" --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
    --window-size="${WINDOW_SIZE:-1400,4000}" --screenshot="$out_abs" "file://$report_abs" \
    >/dev/null 2>&1 || { echo "error: chromium failed on $report" >&2; exit 1; }
[[ -s $out_abs ]] || { echo "error: no screenshot written to $out" >&2; exit 1; }
echo "$out_abs"
