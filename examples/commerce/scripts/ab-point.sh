#!/usr/bin/env bash
# One end-to-end point on isolated names (own topic, groups, databases, ports 1818x), for A/B
# runs of a setting: ab-point.sh LABEL MAX_BATCH BINDIR -- commerce-load args...
# BINDIR holds release builds of `commerce` and `commerce-load`; the databases are dropped after.
set -u
label=$1; batch=$2; bindir=$3; shift 4
run="h14${label}$(date +%H%M%S)"
export COMMERCE_TOPIC="$run" COMMERCE_DATABASE_PREFIX="${run}_" COMMERCE_GROUP_PREFIX="$run" \
  COMMERCE_INVENTORY="$run" COMMERCE_INBOX_MAX_BATCH="$batch" \
  ORDER_ADDR=127.0.0.1:18181 PAYMENT_ADDR=127.0.0.1:18182 SHIPPING_ADDR=127.0.0.1:18183 \
  NOTIFICATION_ADDR=127.0.0.1:18184 RUST_LOG=warn
"$bindir/commerce" > "${LOG_DIR:-/tmp}/$run.services.log" 2>&1 &
pid=$!
for _ in $(seq 1 120); do curl -sf http://127.0.0.1:18181/health >/dev/null && break; sleep 0.5; done
echo "== $label batch=$batch run=$run load: $(cut -d' ' -f1-3 /proc/loadavg) args: $*"
"$bindir/commerce-load" --order-url http://127.0.0.1:18181 --payment-url http://127.0.0.1:18182 \
  --shipping-url http://127.0.0.1:18183 --notification-url http://127.0.0.1:18184 "$@" 2>&1 | grep -v "^\s*$" | grep -vE "^\[|━" 
echo "== end load: $(cut -d' ' -f1-3 /proc/loadavg)"
kill "$pid"; wait "$pid" 2>/dev/null
for s in order payment shipping notification; do
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS \"${run}_${s}_service\" WITH (FORCE)" postgres 2>/dev/null
done
