#!/usr/bin/env bash
# Installs SoftHSM2 (the development token), OpenSC's pkcs11-tool (which
# the tests use to inspect the token independently), pkcs11-spy (which counts
# the daemon's calls to the module) and openssl (which checks the audit log's
# signatures), PostgreSQL and OpenSSL's headers (the PostgreSQL store), a C
# compiler and make (the daemon's allocator, jemalloc), Prometheus with
# promtool (the metrics tests) and jq (the README's CLI tour) when they are
# missing.
# Debian and Ubuntu; uses sudo when not run as root.
set -euo pipefail
need=()
command -v softhsm2-util >/dev/null 2>&1 || need+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || need+=(opensc)
# The audit tests verify exported signatures with openssl's own tool.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# pkcs11-spy logs every call the daemon makes to the module (tests count logins).
compgen -G "/usr/lib/*/pkcs11-spy.so" >/dev/null || compgen -G "/usr/lib/*/*/pkcs11-spy.so" >/dev/null || need+=(opensc-pkcs11)
# The PostgreSQL store's tests start throwaway clusters with its server
# binaries (initdb, pg_ctl, psql); its TLS builds on the system's OpenSSL.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
# The daemon's allocator, jemalloc, is built from source (daemon/Cargo.toml).
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v make >/dev/null 2>&1 || need+=(make)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
# The signing tests verify `keyhaven jwt sign` tokens with PyJWT (Debian's).
/usr/bin/python3 -c 'import jwt, cryptography' >/dev/null 2>&1 || need+=(python3-jwt python3-cryptography)
# The metrics tests check the exposition with promtool and scrape the daemon with a real Prometheus.
{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || need+=(prometheus)
# The audit sink tests ship records to a real rsyslogd (run by the test).
command -v rsyslogd >/dev/null 2>&1 || [ -x /usr/sbin/rsyslogd ] || need+=(rsyslog)
# The README's CLI tour (tests/tests/readme.rs runs it as written) pipes JSON through jq.
command -v jq >/dev/null 2>&1 || need+=(jq)
[ "${#need[@]}" -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo=sudo
echo "installing ${need[*]} with apt-get" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
