#!/usr/bin/env bash
# install-deps.sh - install (idempotently) every Debian 12 package rosterd
# needs to build, test, fuzz, benchmark and run its demo. Needs root.
# Postfix is preseeded to "No configuration": only its smtp-sink and
# smtp-source programs are used; its mail service is never started.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config clang llvm libclang-rt-14-dev
  libevent-dev librabbitmq-dev libpq-dev libmsgpack-dev libesmtp-dev
  libsystemd-dev libinih-dev libcmocka-dev libjansson-dev libunistring-dev libcsv-dev
  postgresql postgresql-contrib rabbitmq-server amqp-tools postfix
  python3 python3-pika python3-psycopg2 python3-msgpack python3-pytest
  python3-aiosmtpd iproute2 procps psmisc openssl ca-certificates systemd
  libssl-dev valgrind
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-deps: missing packages (${missing[*]}); run as root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
# The Debian packages try to start their services; there is no init here
# that could, and we never want the system instances: policy-rc.d says no.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 0755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -q --no-install-recommends "${missing[@]}"
