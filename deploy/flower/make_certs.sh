#!/usr/bin/env bash
# Throwaway credentials for a test federation: a certificate authority, the SuperLink's TLS
# certificate for the given addresses, and one SuperNode authentication key pair per site.
#   deploy/flower/make_certs.sh OUT_DIR SUPERLINK_ADDRESS[,MORE...] [SITE...]
#   e.g. deploy/flower/make_certs.sh certs 127.0.0.1,localhost hospital_a hospital_b hospital_c
# Writes OUT_DIR/ca.crt (give it to every site), OUT_DIR/superlink.{pem,key} (the coordinator's),
# OUT_DIR/<site> and OUT_DIR/<site>.pub (the site keeps the first; the coordinator registers the
# second; no SITE: only the SuperLink's, e.g. for the Simulation Runtime). A real federation gets
# its server certificate from the hospital's PKI instead.
set -euo pipefail
out=$1 addresses=$2
shift 2
mkdir -p "$out"
umask 077
san=""
for a in ${addresses//,/ }; do
  if [[ $a =~ ^[0-9.]+$ || $a == *:* ]]; then san+="IP:$a,"; else san+="DNS:$a,"; fi
done
openssl req -x509 -newkey rsa:3072 -nodes -days 30 -subj "/CN=medmamba-federation-ca" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:3072 -nodes -subj "/CN=${addresses%%,*}" \
  -keyout "$out/superlink.key" -out "$out/superlink.csr" 2>/dev/null
openssl x509 -req -in "$out/superlink.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days 30 \
  -extfile <(printf "subjectAltName=%s\nextendedKeyUsage=serverAuth\n" "${san%,}") -out "$out/superlink.pem" 2>/dev/null
rm -f "$out/superlink.csr" "$out/ca.srl"
for site in "$@"; do
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "$site" -f "$out/$site" <<<y >/dev/null
  chmod 644 "$out/$site.pub"
done
chmod 644 "$out/ca.crt" "$out/superlink.pem"
echo "wrote $out: ca.crt, superlink.pem/.key, $(printf '%s(.pub) ' "$@")"
