#!/bin/sh
# A private CA and the ClickHouse server certificate for deploy/compose.yaml (TLS between synthwatch,
# Grafana and ClickHouse), and the intake gateway's certificate. Run once from deploy/:  sh tls/make-certs.sh
# (GATEWAY_HOSTNAME=intake.example.org sh tls/make-certs.sh names the gateway's host; default localhost).
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
# The intake gateway (profile `gateway`): its own key in ../gateway-tls, mounted into the gateway only, so
# the worker containers (which mount tls/) never see it. Labs check it against ca.crt; for labs outside this
# host prefer a certificate from a public or national CA for GATEWAY_HOSTNAME (same two file names).
gateway_host=${GATEWAY_HOSTNAME:-localhost}
openssl req -newkey rsa:3072 -nodes -subj "/CN=$gateway_host" -keyout ../gateway-tls/tls.key -out gateway.csr
printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\n' "$gateway_host" > gateway.ext
openssl x509 -req -in gateway.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -extfile gateway.ext \
    -out ../gateway-tls/tls.crt
rm -f gateway.csr gateway.ext
# The gateway runs as uid 10001, group 0 (deploy/Dockerfile) and reads its key through the group: on a Linux
# host give the key to group 0 (`chgrp 0`) or to that user (deploy/README.md, "Intake gateway").
chmod 0644 ../gateway-tls/tls.crt
chmod 0640 ../gateway-tls/tls.key
echo "written: $(pwd)/ca.crt server.crt server.key, $(cd ../gateway-tls && pwd)/tls.crt tls.key"
