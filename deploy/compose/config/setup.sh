#!/bin/sh
# One-off setup of the demo federation's volumes (the `setup` service in compose.yaml; also run
# outside containers by tests/integration/test_deploy.py). It issues certificates from a fresh
# federation CA and gives each volume only its own key; makes synthetic OMOP data for each trust
# and loads it with `fedtre node load`. Real trusts load their own extracts and never receive
# another party's key; a real federation's CA is kept offline by its operator.
#   OUT     where the volumes are mounted (default /setup)
#   CONFIG  this folder (default /config)
#   OWNER   uid:gid to own the volumes afterwards (the image's user, 10001:10001)
set -eu
OUT="${OUT:-/setup}"
CONFIG="${CONFIG:-/config}"
if [ -e "$OUT/coordinator/.setup-done" ]; then
  echo "the demo federation is already set up"
  exit 0
fi
umask 077
ca="$OUT/ca"
rm -rf "$ca" "$OUT/scratch"
fedtre pki init --dir "$ca"
fedtre pki issue --dir "$ca" --role coordinator --name hub
fedtre pki issue --dir "$ca" --role researcher --name alice
place() {  # place VOLUME CERT...: the CA certificate, and each named certificate with its key
  volume="$1"
  shift
  mkdir -p "$OUT/$volume/pki"
  cp "$ca/ca.pem" "$OUT/$volume/pki/"
  for cert in "$@"; do
    cp "$ca/$cert.pem" "$ca/$cert.key" "$OUT/$volume/pki/"
  done
}
place coordinator coordinator-hub
place researcher researcher-alice
seed=11
for spec in trust-a:5000 trust-b:8000 trust-c:12000; do
  trust="${spec%%:*}"
  persons="${spec##*:}"
  fedtre pki issue --dir "$ca" --role node --name "$trust"
  place "$trust" "node-$trust"
  fedtre synth --persons "$persons" --seed "$seed" --out "$OUT/scratch/$trust"
  fedtre node load --config "$CONFIG/$trust.toml" --source "$OUT/scratch/$trust" \
    --out "$OUT/$trust/$trust.duckdb" --memory-limit 512MB
  seed=$((seed + 1))
done
rm -rf "$OUT/scratch" "$ca"
touch "$OUT/coordinator/.setup-done"  # before the volumes change hands (root keeps only CHOWN)
for volume in trust-a trust-b trust-c coordinator researcher; do
  chmod 0700 "$OUT/$volume"  # each volume owner-only, like /var/lib/fedtre in the image
done
if [ -n "${OWNER:-}" ]; then
  chown -R "$OWNER" "$OUT/trust-a" "$OUT/trust-b" "$OUT/trust-c" "$OUT/coordinator" "$OUT/researcher"
fi
echo "demo federation set up"
