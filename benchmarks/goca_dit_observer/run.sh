#!/bin/bash
# GOCA observer on a bf16 DiT, before vs after, in one run (issue #32; README "GOCA on bf16 DiTs").
#   bash benchmarks/goca_dit_observer/run.sh BEFORE_COMMIT [AFTER_COMMIT, default HEAD]
# Each commit's difffeat package (git archive) runs in its own processes: forward.py (SD3.5 Medium, random weights,
# bf16, 256 px: 3 alternated bare/observed pairs, 2 more observations, 3 pairs more, each with a thread-summed time
# breakdown of the observer's parts), then layer.py (one SD3.5-Medium-shaped joint layer vs its bf16 SDPA) at 1024
# and 256 query rows. Run it under the heavy-job lock: `flock /tmp/difffeat-heavy.lock timeout 720 bash ...`.
set -e
here=$(cd "$(dirname "$0")" && pwd); root=$(git -C "$here" rev-parse --show-toplevel)
py=${PYTHON:-python}; work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
for v in before after; do
  commit=$([ $v = before ] && echo "$1" || echo "${2:-HEAD}")
  mkdir "$work/$v"; git -C "$root" archive "$commit" difffeat configs hooks | tar -x -C "$work/$v"
done
export HF_HUB_OFFLINE=1
echo "start $(date -u) $(uptime)"
for v in before after; do
  echo "=== $v"; PYTHONPATH=$work/$v $py "$here/forward.py" 256 2>&1 | grep -v -i "warn\|kept in float32"
  echo "uptime $(uptime)"
done
for n in 1024 256; do for v in before after; do
  echo -n "$v: "; PYTHONPATH=$work/$v $py "$here/layer.py" $n 2>&1 | grep -v -i warn
done; done
echo "end $(date -u)"
