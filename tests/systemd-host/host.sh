#!/usr/bin/env bash
# The systemd-host test's host side (tests/tests/systemd_host.rs runs it):
# packages the built binaries (packaging/build-deb), boots a minimal Debian 12
# with systemd as PID 1 in a container, and runs in-container.sh there, which
# follows OPERATIONS.md's commands and asserts what issue 14 lists.
#
# - The root file system comes from `debootstrap --variant=minbase bookworm`
#   out of http://deb.debian.org/debian, with systemd, SoftHSM2 and OpenSC,
#   and is cached in $KEYHAVEN_TEST_CACHE (default /var/cache/keyhaven-test)
#   under a name that carries its recipe's version; it is made again when
#   missing. Each run boots an overlay on it (a copy where overlays cannot
#   be mounted), so the cache stays clean.
# - `systemd-nspawn -b --register=no --keep-unit`: the host's PID 1 need not
#   be systemd (no machined to register with, no scope to make).
# - RLIMIT_MEMLOCK unlimited for the container's PID 1, as a host's PID 1
#   has it: the process that runs this test may have a finite hard limit,
#   and then the unit's LimitMEMLOCK=infinity could not be granted.
# - Commands run inside through nsenter into the namespaces of the
#   container's PID 1 (nspawn's child).
# - The container is stopped and the overlay removed on every exit.
# Exits 77, with a SKIPPED line naming what is missing, when it cannot run.
# KEYHAVEN_DEB_PROFILE=release packages target/release instead of debug.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
here="$repo/tests/systemd-host"
cache="${KEYHAVEN_TEST_CACHE:-/var/cache/keyhaven-test}"
recipe="bookworm-minbase-systemd-softhsm2-v1"
include="systemd,dbus,softhsm2,opensc"
mirror="http://deb.debian.org/debian"
profile="${KEYHAVEN_DEB_PROFILE:-debug}"

skip() { echo "SKIPPED: the systemd-host test cannot run: $*" >&2; exit 77; }
[ "$(id -u)" = 0 ] || skip "not root (debootstrap, overlay mounts and systemd-nspawn need root)"
missing=()
for t in debootstrap systemd-nspawn nsenter dpkg-deb flock; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
[ ${#missing[@]} -eq 0 ] || skip "missing ${missing[*]} (apt-get install debootstrap systemd-container; .ci/run does)"

t0=$(date +%s)
work=$(mktemp -d /var/tmp/keyhaven-systemd-host.XXXXXX)
nspawn_pid=""
cleanup() {
    local rc=$?
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid" 2>/dev/null || true   # nspawn shuts the container down
        for _ in $(seq 1 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$nspawn_pid" 2>/dev/null || true
    fi
    if mountpoint -q "$work/root" 2>/dev/null; then
        umount "$work/root" 2>/dev/null || umount -l "$work/root" || true
    fi
    rm -rf "$work"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. The package, from the binaries the suite built.
mkdir -p "$work/share"
deb=$("$repo/packaging/build-deb" --profile "$profile" --no-build --out "$work/share")
# The same binaries, one version up: an upgrade for OPERATIONS.md §1.8.
mkdir -p "$work/share/upgrade"
"$repo/packaging/build-deb" --profile "$profile" --no-build --out "$work/share/upgrade" \
    --version "$(dpkg-deb -f "$deb" Version)+upgrade1" >/dev/null
cp "$repo/docs/OPERATIONS.md" "$here/in-container.sh" "$work/share/"
echo "package: $(basename "$deb") ($(du -h "$deb" | cut -f1), $profile build)"

# 2. The cached root.
mkdir -p "$cache"
image="$cache/$recipe"
(
    flock 9
    if [ ! -e "$image/.complete" ]; then
        echo "debootstrap $recipe into $image (not cached yet)"
        rm -rf "$image" "$image.tmp"
        t=$(date +%s)
        debootstrap --variant=minbase --include="$include" bookworm "$image.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
            { tail -20 "$cache/debootstrap.log" >&2; echo "FAIL: debootstrap failed (log: $cache/debootstrap.log)" >&2; exit 1; }
        touch "$image.tmp/.complete"
        mv "$image.tmp" "$image"
        echo "debootstrap: $(($(date +%s) - t)) s"
    fi
) 9>"$cache/.lock"

# 3. Boot an overlay on it.
mkdir -p "$work/upper" "$work/ovl" "$work/root"
if ! mount -t overlay overlay -o "lowerdir=$image,upperdir=$work/upper,workdir=$work/ovl" "$work/root" 2>"$work/mount.err"; then
    # /var/tmp on an overlay itself (some CI containers): a copy instead.
    echo "overlay mount failed ($(cat "$work/mount.err")); copying the root instead"
    cp -a --reflink=auto "$image/." "$work/root/"
fi
name="khtest-$$"
systemd-nspawn -q -b --register=no --keep-unit -M "$name" -D "$work/root" \
    --bind-ro="$work/share:/mnt/keyhaven" --console=read-only \
    --rlimit=RLIMIT_MEMLOCK=infinity \
    >"$work/console.log" 2>&1 </dev/null &
nspawn_pid=$!
leader=""
for _ in $(seq 1 100); do
    leader=$(cat /proc/"$nspawn_pid"/task/*/children 2>/dev/null | awk '{ print $1 }')
    [ -n "$leader" ] && [ "$(cat /proc/"$leader"/comm 2>/dev/null)" = systemd ] && break
    leader=""
    kill -0 "$nspawn_pid" 2>/dev/null || break
    sleep 0.1
done
[ -n "$leader" ] || { cat "$work/console.log" >&2; echo "FAIL: the container's systemd did not start" >&2; exit 1; }
inside() {
    nsenter --target "$leader" --mount --uts --ipc --net --pid --cgroup -- \
        /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb "$@"
}
# systemctl needs PID 1's private socket, which it makes early in the boot.
for _ in $(seq 1 300); do
    [ -S "/proc/$leader/root/run/systemd/private" ] && break
    sleep 0.1
done
state=$(inside timeout 120 systemctl is-system-running --wait || true)
echo "container booted ($state) in $(($(date +%s) - t0)) s since the start"
case "$state" in
    running|degraded) ;;
    *) tail -30 "$work/console.log" >&2; echo "FAIL: the container did not boot: $state" >&2; exit 1 ;;
esac

# 4. The operator's steps and the assertions.
rc=0
inside timeout 900 bash /mnt/keyhaven/in-container.sh || rc=$?
if [ $rc -ne 0 ]; then
    echo "--- the container's journal for keyhavend (last 60 lines)" >&2
    inside journalctl -u keyhavend.service -u keyhavend.socket --no-pager -n 60 >&2 || true
fi
echo "systemd-host test: $(($(date +%s) - t0)) s in all"
exit $rc
