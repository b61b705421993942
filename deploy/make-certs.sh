#!/usr/bin/env sh
# Makes the TLS files docker-compose.yml mounts at /certs: a CA, and the coordinator's
# certificate (host name `coordinator`) signed by it. The coordinator listens on every
# interface there, so it refuses to start without TLS and SCHEMASHIFT_TOKEN.
# Usage: deploy/make-certs.sh [DIR]   (default: deploy/certs next to this script)
set -eu
dir="${1:-$(dirname "$0")/certs}"
mkdir -p "$dir"
cd "$dir"
if [ -f coordinator.pem ] && [ -f coordinator.key ] && [ -f ca.pem ]; then
  echo "make-certs: $(pwd) already has ca.pem, coordinator.pem and coordinator.key"
  exit 0
fi
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=schemashift compose CA" \
  -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=coordinator" \
  -keyout coordinator.key -out coordinator.csr 2>/dev/null
printf 'subjectAltName=DNS:coordinator,DNS:localhost,IP:127.0.0.1\n' > san.ext
openssl x509 -req -in coordinator.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \
  -extfile san.ext -out coordinator.pem 2>/dev/null
rm -f coordinator.csr san.ext ca.srl
# The coordinator container reads the key as another user.
chmod 644 coordinator.key
echo "make-certs: wrote ca.pem, coordinator.pem and coordinator.key to $(pwd)"
