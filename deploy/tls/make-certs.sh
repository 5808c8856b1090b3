#!/bin/sh
# A private CA and the ClickHouse server certificate for deploy/compose.yaml (TLS between synthwatch,
# Grafana and ClickHouse). Run once from deploy/:  sh tls/make-certs.sh
# Writes tls/ca.crt (mounted into the synthwatch containers and Grafana to verify the server) and
# tls/server.crt + tls/server.key (mounted into ClickHouse). The CA key stays in tls/ca.key: keep it off
# the host once the certificates exist. On Kubernetes use cert-manager or your PKI instead.
set -eu
cd "$(dirname "$0")"
umask 077
[ -f ca.key ] || openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=synthwatch compose CA" \
    -keyout ca.key -out ca.crt
openssl req -newkey rsa:3072 -nodes -subj "/CN=clickhouse" -keyout server.key -out server.csr
printf 'subjectAltName=DNS:clickhouse,DNS:localhost,IP:127.0.0.1\n' > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -extfile server.ext -out server.crt
rm -f server.csr server.ext
# ClickHouse runs as uid 101 in its image and must read its key; the CA certificate is public.
chmod 0644 ca.crt server.crt
chmod 0640 server.key
echo "written: $(pwd)/ca.crt server.crt server.key"
