#!/bin/sh
# Inside the image build: install-lock.sh VENV LOCK makes a virtualenv holding exactly LOCK.
# The lock's second line names the Python it was resolved with (tools/python/lock.sh); another
# interpreter can need other packages (markers), so it is refused here, at build time, rather
# than failing on import in production. `pip check` proves the lock is complete.
set -eu
venv="$1"
lock="$2"
want="$(sed -n 's/^# python //p' "$lock")"
have="$(python3.11 -c 'import platform; print(platform.python_version())')"
if [ "$want" != "$have" ]; then
  echo "install-lock.sh: $lock was resolved with Python $want but the base image has $have;" \
    "re-run tools/python/lock.sh with that interpreter or use the matching base" >&2
  exit 1
fi
if [ -n "${CA_CERTS_PEM:-}" ]; then
  # A private index or a TLS-inspecting proxy: trust its CA for this build step only.
  cat /etc/ssl/certs/ca-certificates.crt >/tmp/build-ca.pem
  printf '%s\n' "$CA_CERTS_PEM" >>/tmp/build-ca.pem
  export PIP_CERT=/tmp/build-ca.pem
fi
python3.11 -m venv "$venv"
"$venv/bin/pip" install --no-deps -r "$lock"
"$venv/bin/pip" check
rm -f /tmp/build-ca.pem
