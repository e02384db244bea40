#!/usr/bin/env bash
# Where an order's CPU goes: one closed-loop point (ab-point.sh) under `perf record -a -g`,
# then the CPU share of each process (and its kernel part), a flame graph of the whole
# machine, and the statements PostgreSQL spent its time on (pg_stat_statements).
#   profile.sh BINDIR OUT_DIR [commerce-load args...]   (default: --orders 4000 --concurrency 32)
# Needs perf, inferno (cargo install inferno) and pg_stat_statements (scripts/services
# preloads it). BINDIR holds release builds of `commerce` and `commerce-load`.
set -euo pipefail
bindir=$1; out=$2; shift 2
args=("$@"); [ ${#args[@]} -gt 0 ] || args=(--orders 4000 --concurrency 32)
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
psql -qAt -h 127.0.0.1 -U postgres -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" \
  -c "SELECT pg_stat_statements_reset()" postgres >/dev/null
# Sample 8 s from 4 s in: past the start-up, before the drain.
(sleep 4; perf record -a -g -F 499 -o "$out/perf.data" -- sleep 8 >/dev/null 2>&1) &
LOG_DIR="$out" "$here/ab-point.sh" profile 64 "$bindir" -- "${args[@]}" | tee "$out/load.txt"
wait
perf script -i "$out/perf.data" 2>/dev/null | inferno-collapse-perf --all > "$out/stacks.folded"
inferno-flamegraph --title "commerce under load: every process on the machine (perf -a)" \
  --minwidth 0.2 < "$out/stacks.folded" > "$out/flame.svg"
# Per process (perf's thread names): share of all samples, and the kernel's part of it.
awk '{ n = $NF; split($1, frames, ";"); p = frames[1]; all += n; total[p] += n
       if (frames[length(frames)] ~ /_\[k\]$/) kernel[p] += n }
     END { for (p in total) if (total[p] / all > 0.005)
             printf "%6.1f%%  kernel %5.1f%%  %s\n", 100 * total[p] / all, 100 * kernel[p] / total[p], p }' \
  "$out/stacks.folded" | sort -rn > "$out/processes.txt"
psql -q -h 127.0.0.1 -U postgres -c "SELECT calls, round(total_exec_time) AS ms,
    round(mean_exec_time::numeric, 3) AS mean_ms, rows,
    left(regexp_replace(query, '\s+', ' ', 'g'), 110) AS query
  FROM pg_stat_statements WHERE query NOT LIKE '%DATABASE%'
  ORDER BY total_exec_time DESC LIMIT 25" postgres > "$out/statements.txt"
echo "== CPU per process (share of all samples; kernel part of it)"; cat "$out/processes.txt"
echo "== flame graph: $out/flame.svg; statements: $out/statements.txt"
