#!/usr/bin/env bash
# Runs inside the booted Debian container (systemd as PID 1), as root, from
# the directory that holds the .deb and OPERATIONS.md (bind-mounted by
# host.sh). It runs OPERATIONS.md's own command blocks, each marked
# `<!-- test: NAME -->` on the line before its fence, in the order an
# operator would, and between them asserts what issue 14 lists. Any failed
# command or assertion exits non-zero with a line saying which.
set -euo pipefail
export LANG=C DEBIAN_FRONTEND=noninteractive SYSTEMD_PAGER= SYSTEMD_COLORS=0
cd "$(dirname "$0")"
DOC=$PWD/OPERATIONS.md
step() { echo; echo "=== $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

# The commands of the block named $1, as the docs show them.
block() {
    awk -v name="$1" '
        $0 == "<!-- test: " name " -->" { armed = 1; next }
        armed && /^```/ { if (inside) exit; inside = 1; next }
        inside { print }' "$DOC"
}
# Runs a docs block as an operator pasting it into a root shell would (each
# command must succeed: -e).
docs() {
    local code
    code=$(block "$1")
    [ -n "$code" ] || fail "OPERATIONS.md has no block marked <!-- test: $1 -->"
    step "OPERATIONS.md block '$1'"
    echo "$code" | sed 's/^/    | /'
    bash -eu -c "$code" || fail "OPERATIONS.md block '$1' failed"
}
prop() { systemctl show -P "$2" "$1"; }
expect_prop() {
    local got
    got=$(prop "$1" "$2")
    [ "$got" = "$3" ] || fail "$1 $2 is '$got', expected '$3'"
}
as() { local u=$1; shift; runuser -u "$u" -- "$@"; }
journal_since() { journalctl -u keyhavend.service --no-pager -o cat --since "@$1" "${@:2}"; }

step "install the package: nothing starts without a config"
docs install
for g in keyhaven keyhaven-clients keyhaven-admins; do getent group "$g" >/dev/null || fail "group $g missing"; done
getent passwd keyhaven | grep ':/var/lib/keyhaven:/usr/sbin/nologin$' >/dev/null || fail "user keyhaven: $(getent passwd keyhaven)"
[ "$(stat -c '%U:%G %a' /var/lib/keyhaven)" = "keyhaven:keyhaven 700" ] || fail "/var/lib/keyhaven is $(stat -c '%U:%G %a' /var/lib/keyhaven)"
[ "$(stat -c '%U:%G %a' /etc/keyhaven)" = "root:root 755" ] || fail "/etc/keyhaven is $(stat -c '%U:%G %a' /etc/keyhaven)"
[ -f /etc/keyhaven/keyhaven.toml.example ] || fail "no example config"
[ ! -e /etc/keyhaven/keyhaven.toml ] || fail "the package wrote a config"
expect_prop keyhavend.socket ActiveState inactive
expect_prop keyhavend.service ActiveState inactive
help=$(keyhavend --help) && echo "$help" | grep 'check' >/dev/null || fail "keyhavend --help does not list check"
help=$(keyhaven --help) && echo "$help" | grep 'encrypt' >/dev/null || fail "keyhaven --help does not list encrypt"
# The maintainer script again (a reinstall, an interrupted configure):
# nothing changes, nothing fails, still nothing started.
/var/lib/dpkg/info/keyhaven.postinst configure >/dev/null
/var/lib/dpkg/info/keyhaven.postinst configure >/dev/null
[ "$(getent group keyhaven-clients | cut -d: -f1)" = keyhaven-clients ] || fail "groups after a second configure"
[ "$(stat -c '%U:%G %a' /var/lib/keyhaven)" = "keyhaven:keyhaven 700" ] || fail "/var/lib/keyhaven after a second configure"
expect_prop keyhavend.socket ActiveState inactive
ok "package installed; users, groups, directories; nothing started; postinst runs again unchanged"

# Test users: an application, an operator, and a user outside the groups.
useradd --system --no-create-home --shell /usr/sbin/nologin billing
useradd --system --no-create-home --shell /usr/sbin/nologin alice
useradd --system --no-create-home --shell /usr/sbin/nologin outsider

docs softhsm
docs config-softhsm
# The test's own policy, beside the example's operators: billing may use
# acme's keys, and a rule names a user nobody has (a warning at each start).
cat >> /etc/keyhaven/keyhaven.toml <<'TOML'

[[policy.rules]]
name = "billing service"
principals = ["user:billing"]
operations = ["encrypt", "decrypt", "datakey"]
keys = ["acme/*"]

[[policy.rules]]
name = "gone"
principals = ["user:ghost-user-kh"]
operations = ["encrypt"]
keys = ["acme/*"]
TOML
t_start=$(date +%s)
docs start

step "socket activation and readiness"
expect_prop keyhavend.socket ActiveState active
expect_prop keyhavend.service ActiveState inactive
[ "$(stat -c '%U:%G %a' /run/keyhaven)" = "root:root 711" ] || fail "/run/keyhaven is $(stat -c '%U:%G %a' /run/keyhaven)"
[ "$(stat -c '%U:%G %a' /run/keyhaven/keyhaven.sock)" = "keyhaven:keyhaven-clients 660" ] || fail "socket is $(stat -c '%U:%G %a' /run/keyhaven/keyhaven.sock)"
docs clients
expect_prop keyhavend.service ActiveState active
expect_prop keyhavend.service SubState running
expect_prop keyhavend.service Type notify
journal_since "$t_start" | grep 'listening' >/dev/null || fail "no 'listening' line in the journal"
# LimitMEMLOCK=infinity: systemd grants it when PID 1 may (its hard limit
# unlimited, or CAP_SYS_RESOURCE); otherwise it quietly gives the closest
# limit, and the daemon must then say, as a warning, that it did not lock.
if [ "$(awk '/^Max locked memory/ { print $5 }' /proc/1/limits)" = unlimited ]; then
    journal_since "$t_start" | grep 'memory locked (mlockall)' >/dev/null ||
        fail "the daemon did not lock its memory under LimitMEMLOCK=infinity"
    memlock="memory locked"
else
    journal_since "$t_start" -p warning | grep 'memory not locked: RLIMIT_MEMLOCK is' >/dev/null ||
        fail "RLIMIT_MEMLOCK is finite here, and the daemon did not warn that it did not lock its memory"
    memlock="memory not locked, with a warning: this host caps RLIMIT_MEMLOCK at $(awk '/^Max locked memory/ { print $5 }' /proc/1/limits) bytes for the container (no CAP_SYS_RESOURCE)"
fi
ok "the first client connection started the service; it sent READY=1 (Type=notify, active/running); $memlock"

step "clients: in keyhaven-clients served, outside refused"
who=$(as billing keyhaven whoami) || fail "billing's whoami failed"
echo "$who" | grep '"user": "billing"' >/dev/null || fail "billing's whoami: $who"
if out=$(as outsider keyhaven health 2>&1); then fail "outsider was served: $out"; fi
echo "$out" | grep 'Permission denied' >/dev/null || fail "outsider's error does not say Permission denied: $out"
ok "outsider: $out"
as alice keyhaven key create acme/pii >/dev/null
ct=$(echo -n 'card 4111' | as billing keyhaven encrypt acme/pii)
[ "$(echo -n "$ct" | as billing keyhaven decrypt)" = 'card 4111' ] || fail "decrypt did not give the plaintext back"
if as outsider keyhaven encrypt acme/pii </dev/null >/dev/null 2>&1; then fail "outsider encrypted"; fi
ok "billing encrypts and decrypts acme/pii"

step "journalctl -p warning shows the daemon's warnings"
journalctl -u keyhavend.service -p warning --no-pager -o cat --since "@$t_start" | grep 'ghost-user-kh' ||
    fail "the warning about the unknown user is not at priority warning or higher"
ok "warning at priority <= 4"

step "systemctl reload with a broken policy fails and keeps the old one"
pid=$(prop keyhavend.service MainPID)
cp /etc/keyhaven/keyhaven.toml /root/keyhaven.toml.good
sed -i 's/operations = \["encrypt", "decrypt", "datakey"\]/operations = ["encrypt", "no-such-operation"]/' /etc/keyhaven/keyhaven.toml
grep -q no-such-operation /etc/keyhaven/keyhaven.toml || fail "the test could not break the policy"
if systemctl reload keyhavend.service; then fail "systemctl reload exited 0 on a broken policy"; fi
[ "$(prop keyhavend.service MainPID)" = "$pid" ] || fail "the daemon restarted on a failed reload"
echo -n x | as billing keyhaven encrypt acme/pii >/dev/null || fail "the old policy is not in force after the failed reload"
echo -n "$ct" | as billing keyhaven decrypt >/dev/null || fail "billing lost decrypt after the failed reload"
cp /root/keyhaven.toml.good /etc/keyhaven/keyhaven.toml
systemctl reload keyhavend.service || fail "reload of the good policy failed"
ok "reload refused (exit non-zero), the daemon and its old policy stayed"

step "the journald audit sink: one journal entry per record, structured fields, priority by outcome"
t_journal=$(date +%s)
docs audit-journald
entry() { journalctl --no-pager -o cat --output-fields="$1" SYSLOG_IDENTIFIER=keyhaven KEYHAVEN_OP=key_create KEYHAVEN_KEY=journald-shipped | tail -n 1; }
for _ in $(seq 50); do [ -n "$(entry KEYHAVEN_SEQ)" ] && break; sleep 0.1; done
seq=$(entry KEYHAVEN_SEQ)
[ -n "$seq" ] || fail "no journal entry for the key_create record: $(journalctl --no-pager -o json SYSLOG_IDENTIFIER=keyhaven | tail -n 3)"
[ "$(entry PRIORITY)" = 6 ] || fail "an ok record's PRIORITY is '$(entry PRIORITY)', not 6"
[ "$(entry KEYHAVEN_OUTCOME)" = ok ] || fail "KEYHAVEN_OUTCOME is '$(entry KEYHAVEN_OUTCOME)'"
[ "$(entry KEYHAVEN_NODE)" = "$(hostname)" ] || fail "KEYHAVEN_NODE is '$(entry KEYHAVEN_NODE)', not the host name $(hostname)"
record=$(entry KEYHAVEN_RECORD)
echo "$record" | grep "\"seq\":$seq," >/dev/null || fail "KEYHAVEN_RECORD is not record $seq: $record"
[ "$(printf '%s' "$record" | sha256sum | cut -d' ' -f1)" = "$(entry KEYHAVEN_HASH)" ] ||
    fail "KEYHAVEN_HASH is not the SHA-256 of KEYHAVEN_RECORD"
# Every record from 1 to this one, once the sink started on the whole log.
n=$(journalctl --no-pager -o cat --output-fields=KEYHAVEN_SEQ SYSLOG_IDENTIFIER=keyhaven | sort -un | awk -v s="$seq" '$1 <= s' | wc -l)
[ "$n" -eq "$seq" ] || fail "the journal holds $n distinct records of 1..$seq"
journal_since "$t_journal" | grep 'audit sink starting' >/dev/null || fail "no 'audit sink starting' line"
ok "record $seq in the journal with KEYHAVEN_* fields, PRIORITY 6, its hash; records 1..$seq all there"

step "stop under load drains; audit verify is intact"
load_dir=$(mktemp -d)
chmod 0777 "$load_dir"
for i in 1 2 3 4; do
    as billing bash -c "ok=0; bad=0; while [ ! -e $load_dir/stop ]; do if echo -n payload | keyhaven encrypt acme/pii >/dev/null 2>>$load_dir/err.$i; then ok=\$((ok+1)); else bad=\$((bad+1)); fi; done; echo \$ok \$bad > $load_dir/count.$i" &
done
sleep 3
t_stop=$(date +%s)
systemctl stop keyhavend.socket keyhavend.service
touch "$load_dir/stop"
wait
expect_prop keyhavend.service Result success
expect_prop keyhavend.service ExecMainStatus 0
served=$(cat "$load_dir"/count.* | awk '{ s += $1 } END { print s }')
[ "$served" -gt 0 ] || fail "no request was served under load"
journal_since "$t_stop" | grep -i 'drain' || fail "no drain line in the journal at stop"
# What OPERATIONS.md §4 says a client sees at a stop: its connection closed
# before its request was read (the client says so whether its read or its
# write noticed: never a raw "Broken pipe"), or no daemon to connect to.
if grep -h . "$load_dir"/err.* | grep -v -e 'closed the connection' -e 'not reachable' -e 'connecting to the daemon'; then
    fail "clients saw errors other than a closed or refused connection"
fi
ok "$served requests served under load; stop drained; client errors: $(cat "$load_dir"/err.* | sort | uniq -c | sort -rn | head -3 | tr '\n' ';')"
docs backup
ls /root/keyhaven-store-*.tar.gz >/dev/null && [ -s "$(ls /root/keyhaven-store-*.tar.gz | head -1)" ] || fail "no backup, or an empty one"
as alice keyhaven audit verify || fail "audit verify failed after the stop under load"
ok "audit verify intact"

step "a wrong PIN: one login attempt, a stopped unit, a clear line at warning or higher"
systemctl stop keyhavend.socket keyhavend.service
cp -p /etc/keyhaven/pin /root/pin.good
(umask 077; echo 'Wr0ngButStr0ngPin9xQ' > /etc/keyhaven/pin)
t_pin=$(date +%s)
if systemctl start keyhavend.service; then fail "the service started with a wrong PIN"; fi
expect_prop keyhavend.service ExecMainStatus 78
sleep 8   # past RestartSec=5s: no restart
expect_prop keyhavend.service ActiveState failed
expect_prop keyhavend.service NRestarts 0
journalctl -u keyhavend.service -p warning --no-pager -o cat --since "@$t_pin" |
    grep 'login to token `keyhaven` failed: the PIN is incorrect' >/dev/null ||
    fail "no start error naming the refused PIN at priority warning or higher"
# A client connection through the socket starts the service again: that
# start must not present the PIN again.
systemctl start keyhavend.socket
as billing keyhaven --timeout 10s health >/dev/null 2>&1 && fail "served with a wrong PIN"
sleep 2
journal_since "$t_pin" -p warning | grep 'it is not presented again' >/dev/null ||
    fail "the start through the socket did not refuse before logging in"
starts=$(journal_since "$t_pin" | grep -c 'Starting keyhavend.service' || true)
# Login attempts, counted twice: the daemon's line for each refused login,
# and SoftHSM2's own line for each C_Login with a wrong PIN (it fails to
# decrypt the token's key with it).
daemon_logins=$(journal_since "$t_pin" | grep -c 'HSM login refused' || true)
token_logins=$(journal_since "$t_pin" | grep -c 'EVP_DecryptFinal failed' || true)
echo "wrong PIN: $starts starts of the service, $daemon_logins refused logins (daemon), $token_logins (SoftHSM2); socket unit: $(prop keyhavend.socket ActiveState)/$(prop keyhavend.socket Result)"
[ "$starts" -ge 2 ] || fail "the socket did not start the service again"
[ "$daemon_logins" = 1 ] || fail "$daemon_logins refused logins in the daemon's log, expected exactly 1"
[ "$token_logins" = 1 ] || fail "$token_logins failed logins in SoftHSM2's log, expected exactly 1"
[ "$(cat /var/lib/keyhaven/store/login-refused 2>/dev/null | wc -c)" -gt 0 ] || fail "no login-refused note"
systemctl stop keyhavend.socket keyhavend.service
systemctl reset-failed keyhavend.service keyhavend.socket
cp -p /root/pin.good /etc/keyhaven/pin
systemctl start keyhavend.socket
as billing keyhaven health >/dev/null || fail "not served after the right PIN came back"
ok "wrong PIN: exit 78, no restart, the socket start refused before login; the right PIN serves again"

step "systemd-analyze security on the live unit"
out=$(systemd-analyze security --no-pager keyhavend.service)
score=$(echo "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
echo "exposure: $score"
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 1.0) }' || { echo "$out" | grep '✗'; fail "exposure $score is over 1.0"; }
ok "exposure $score <= 1.0"

step "metrics: keyhaven metrics over the socket; HTTP needs OPERATIONS.md's drop-in"
as alice keyhaven metrics | grep '^keyhaven_build_info{version=' >/dev/null || fail "keyhaven metrics as an operator"
systemctl stop keyhavend.socket keyhavend.service
systemctl reset-failed keyhavend.service keyhavend.socket 2>/dev/null || true
cp /etc/keyhaven/keyhaven.toml /root/keyhaven.toml.before-metrics
printf '\n[metrics]\nlisten = "127.0.0.1:19464"\n' >> /etc/keyhaven/keyhaven.toml
t_metrics=$(date +%s)
if systemctl start keyhavend.service; then fail "started with [metrics] listen under the unit's RestrictAddressFamilies=AF_UNIX"; fi
journal_since "$t_metrics" | grep 'cannot listen for metrics on 127.0.0.1:19464' >/dev/null ||
    fail "no 'cannot listen for metrics' line without the drop-in"
systemctl stop keyhavend.service; systemctl reset-failed keyhavend.service 2>/dev/null || true
docs metrics-dropin
systemctl start keyhavend.socket
as billing keyhaven health >/dev/null || fail "not served with the metrics drop-in"
scrape=""
for _ in $(seq 1 50); do
    scrape=$(bash -c 'exec 3<>/dev/tcp/127.0.0.1/19464 && printf "GET /metrics HTTP/1.0\r\n\r\n" >&3 && cat <&3' 2>/dev/null) && [ -n "$scrape" ] && break
    sleep 0.2
done
# No `echo | head -1`: under pipefail, head leaving early makes echo's
# next write a SIGPIPE once the scrape outgrows one write (it did, 10.8 KB).
[[ "$scrape" == "HTTP/1.1 200 OK"* ]] || fail "GET /metrics with the drop-in: ${scrape:0:200}"
echo "$scrape" | grep '^keyhaven_requests_total{operation="health",outcome="ok"} [1-9]' >/dev/null || fail "no health count in the scrape"
rm /etc/systemd/system/keyhavend.service.d/metrics.conf
cp /root/keyhaven.toml.before-metrics /etc/keyhaven/keyhaven.toml
systemctl daemon-reload
systemctl restart keyhavend.service
ok "keyhaven metrics served; [metrics] listen refused to start under the unit, served on loopback with the drop-in"

step "upgrade: a newer package restarts a running daemon"
pid=$(prop keyhavend.service MainPID)
(cd upgrade && docs upgrade)
dpkg-query -W -f '${Version}' keyhaven | grep '+upgrade1$' >/dev/null || fail "the upgrade was not installed"
[ "$(prop keyhavend.service MainPID)" != "$pid" ] || fail "the daemon was not restarted by the upgrade"
echo -n "$ct" | as billing keyhaven decrypt >/dev/null || fail "decrypt after the upgrade"
ok "restarted on the new package, old ciphertexts decrypt"

step "remove and purge"
docs remove
[ ! -e /usr/bin/keyhavend ] || fail "keyhavend still there after remove"
[ ! -e /run/keyhaven/keyhaven.sock ] || fail "socket still there after remove"
[ -d /var/lib/keyhaven/store ] && [ -e /etc/keyhaven/pin ] && [ -e /etc/keyhaven/keyhaven.toml ] || fail "remove deleted the store, the PIN or the config"
# A reinstall after remove carries on: the config is there and the socket
# was enabled, so postinst starts the socket, and the store serves.
docs install
expect_prop keyhavend.socket ActiveState active
echo -n "$ct" | as billing keyhaven decrypt >/dev/null || fail "decrypt after remove and reinstall"
docs remove
docs purge
[ ! -e /etc/systemd/system/sockets.target.wants/keyhavend.socket ] || fail "purge left the socket enabled"
[ ! -e /etc/keyhaven/keyhaven.toml.example ] || fail "purge left the example config"
[ -d /var/lib/keyhaven/store ] || fail "purge deleted the store"
dpkg -s keyhaven >/dev/null 2>&1 && fail "keyhaven still known to dpkg after purge"
docs erase
[ ! -e /var/lib/keyhaven ] && ! getent passwd keyhaven >/dev/null || fail "erase left the store or the user"
ok "remove keeps store, config and PIN (a reinstall serves again); purge forgets the units; erase removes the rest"
echo
echo "ALL PASSED"
