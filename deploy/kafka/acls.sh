#!/bin/sh
# SCRAM users and ACLs for synthwatch on an Apache Kafka cluster with an authorizer
# (authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer, allow.everyone.if.no.acl.found=false)
# and a SASL_SSL listener with SCRAM-SHA-512. The same rules as deploy/k8s/kafka-users.yaml (Strimzi).
#
#   deploy/kafka/acls.sh BOOTSTRAP ADMIN_CONFIG worker gateway lab:lab-fr customs:douane-ml ...
#
# BOOTSTRAP: host:port of the SASL_SSL listener; ADMIN_CONFIG: a client properties file of a super user
# (security.protocol, sasl.mechanism, sasl.jaas.config, ssl.truststore...). Each principal gets a random
# password, printed once to standard output as `principal password` (store it, hand it over, do not keep
# this output). Rules: labs and customs may write only their own input topic; only the worker writes
# alerts, sightings and changelogs; only it and the intake gateway (which also writes both input topics)
# write rejects; Grafana and analysts get no Kafka principal.
set -eu

BOOTSTRAP=${1:?usage: acls.sh BOOTSTRAP ADMIN_CONFIG worker|gateway|lab:NAME|customs:NAME ...}
ADMIN_CONFIG=${2:?usage: acls.sh BOOTSTRAP ADMIN_CONFIG worker|gateway|lab:NAME|customs:NAME ...}
shift 2
KAFKA_BIN=${KAFKA_BIN:-/opt/kafka/bin}
APP_ID=${SYNTHWATCH_APP_ID:-synthwatch}

acl() {
    "$KAFKA_BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add "$@"
}

scram_user() {
    password=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    "$KAFKA_BIN/kafka-configs.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --alter \
        --add-config "SCRAM-SHA-512=[password=$password]" --entity-type users --entity-name "$1" > /dev/null
    echo "$1 $password"
}

for principal in "$@"; do
    case "$principal" in
        worker)
            scram_user synthwatch-worker
            user=User:synthwatch-worker
            acl --allow-principal "$user" --operation Describe --operation Read \
                --topic synthwatch. --resource-pattern-type prefixed
            for topic in synthwatch.alerts synthwatch.sightings synthwatch.rejects; do
                acl --allow-principal "$user" --operation Write --topic "$topic"
            done
            acl --allow-principal "$user" --operation Create --operation Describe --operation DescribeConfigs \
                --operation Read --operation Write --topic "$APP_ID-" --resource-pattern-type prefixed
            acl --allow-principal "$user" --operation Describe --operation Read \
                --group "$APP_ID" --resource-pattern-type prefixed
            ;;
        gateway)
            scram_user synthwatch-gateway
            for topic in synthwatch.lab-detections synthwatch.border-seizures synthwatch.rejects; do
                acl --allow-principal User:synthwatch-gateway --operation Describe --operation Write --topic "$topic"
            done
            ;;
        lab:*)
            name=${principal#lab:}
            scram_user "$name"
            acl --allow-principal "User:$name" --operation Describe --operation Write --topic synthwatch.lab-detections
            ;;
        customs:*)
            name=${principal#customs:}
            scram_user "$name"
            acl --allow-principal "User:$name" --operation Describe --operation Write --topic synthwatch.border-seizures
            ;;
        *)
            echo "unknown principal kind: $principal (worker, gateway, lab:NAME or customs:NAME)" >&2
            exit 2
            ;;
    esac
done
