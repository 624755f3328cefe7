#!/bin/sh
# tls-cert.sh - a self-signed certificate for localhost, for `make run` and
# `make cluster` (never for production: see docs/operations.md).
#
#   tls-cert.sh DIR    create DIR/cert.pem and DIR/key.pem unless both exist
#
# EC P-256 key, SAN DNS:localhost and IP:127.0.0.1, valid 825 days (the
# longest a browser accepts for a leaf certificate).  The certificate is its
# own CA: a client trusts it with chat-cli --ca DIR/cert.pem (or Python's
# ssl.create_default_context(cafile=...)).  The key is created readable by
# its owner only.
set -eu

[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
dir=$1
cert=$dir/cert.pem
key=$dir/key.pem

if [ -s "$cert" ] && [ -s "$key" ]; then
    exit 0
fi
command -v openssl >/dev/null || { echo "tls-cert.sh: openssl not installed (contrib/deps.sh)" >&2; exit 1; }
mkdir -p "$dir"
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$key.tmp" -out "$cert.tmp" -days 825 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,digitalSignature,keyCertSign" \
    -addext "extendedKeyUsage=serverAuth" 2>/dev/null
chmod 644 "$cert.tmp"
mv "$key.tmp" "$key"
mv "$cert.tmp" "$cert"
echo "tls-cert.sh: created a self-signed certificate for localhost in $dir"
