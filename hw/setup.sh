#!/usr/bin/env bash
# Prepares this machine for fastrelay, idempotently: Debian packages, the kernel-header
# tree bcc compiles against, bpffs, and a virtual environment with the project installed.
# A second run with everything in place only checks and returns within seconds.
#
# Usage: hw/setup.sh [--quiet]        (as root)
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${FASTRELAY_VENV:-$top/.venv}"
state_dir=/var/lib/fastrelay
quiet=0
[ "${1:-}" = "--quiet" ] && quiet=1

say() { [ "$quiet" = 1 ] || echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (eBPF, namespaces and apt need it); rerun with sudo"
[ "$(uname -s)" = Linux ] || die "fastrelay needs Linux (eBPF on TC); this is $(uname -s)"
[ -e /sys/kernel/btf/vmlinux ] || say "warning: no /sys/kernel/btf/vmlinux (kernel without BTF); the probe will say what that limits"

# --- Debian packages ------------------------------------------------------------------
# python3-bpfcc: bcc (compiles and loads the eBPF programs); iproute2/ethtool: lab and
# probe; iputils-ping: reachability checks in the lab; python3-venv: the project's environment.
apt_packages=(python3-bpfcc python3-venv iproute2 ethtool iputils-ping)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
apt_updated=0
apt_update() {
    [ "$apt_updated" = 1 ] && return
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || die "apt-get update failed (is the Debian mirror reachable?)"
    apt_updated=1
}
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
fi

# --- BPF syscall and bpffs ----------------------------------------------------------
# kernel.unprivileged_bpf_disabled does not matter for root; a kernel without the syscall does.
[ -e /proc/sys/kernel/unprivileged_bpf_disabled ] || die "kernel has no BPF syscall (CONFIG_BPF_SYSCALL off); fastrelay cannot run here"
if ! mountpoint -q /sys/fs/bpf; then
    say "mounting bpffs on /sys/fs/bpf"
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs on /sys/fs/bpf"
fi

# --- kernel headers for bcc ------------------------------------------------------------
# bcc compiles against /lib/modules/$(uname -r)/build. Kernels without modules or
# IKHEADERS have none; Debian's generic headers (uapi only is used) serve, but Debian
# splits them into -common and -amd64 trees while bcc takes one, so merge them with
# symlinks and point build/source at the merge.
rel=$(uname -r)
build=/lib/modules/$rel/build
if [ ! -e "$build/include/linux/kconfig.h" ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
    apt_update
    abi=$(apt-cache show linux-headers-amd64 | sed -n 's/^Depends: linux-headers-\([0-9.]*-[0-9]*\)-amd64.*/\1/p' | head -1)
    [ -n "$abi" ] || die "cannot find Debian's linux-headers-amd64 to stand in for missing kernel headers"
    hdr="$state_dir/kernel-headers/$abi"
    merged="$hdr/merged"
    if [ ! -e "$merged/include/linux/kconfig.h" ]; then
        say "unpacking Debian kernel headers $abi for bcc"
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        (cd "$tmp" && apt-get download -qq "linux-headers-$abi-common" "linux-headers-$abi-amd64" >/dev/null) \
            || die "cannot download linux-headers-$abi (needed because /lib/modules/$rel/build is missing)"
        rm -rf "$hdr"
        mkdir -p "$hdr/tree"
        for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$hdr/tree"; done
        common="$hdr/tree/usr/src/linux-headers-$abi-common"
        arch="$hdr/tree/usr/src/linux-headers-$abi-amd64"
        mkdir -p "$merged/include" "$merged/arch/x86/include"
        for e in "$common"/include/* "$arch"/include/*; do ln -sfn "$e" "$merged/include/$(basename "$e")"; done
        for e in "$common"/arch/x86/include/*; do ln -sfn "$e" "$merged/arch/x86/include/$(basename "$e")"; done
        ln -sfn "$arch/arch/x86/include/generated" "$merged/arch/x86/include/generated"
        ln -sfn "$arch/.config" "$merged/.config"
        ln -sfn "$common/Makefile" "$merged/Makefile"
        rm -rf "$tmp"; trap - EXIT
    fi
    mkdir -p "/lib/modules/$rel"
    ln -sfn "$merged" "$build"
    ln -sfn "$merged" "/lib/modules/$rel/source"
    say "bcc will compile against $merged"
fi

# --- virtual environment -----------------------------------------------------------------
py=$(command -v python3 || true)
[ -n "$py" ] || die "no python3 found"
if [ ! -x "$venv/bin/python" ]; then
    say "creating virtual environment $venv"
    "$py" -m venv "$venv" || die "python3 -m venv failed"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# bcc ships only as a Debian package: expose that one package, nothing else from Debian.
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"

stamp="$venv/.fastrelay-installed"
want=$(cat "$top/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing fastrelay and its dependencies into $venv"
    log="$venv/pip-install.log"
    "$venv/bin/python" -m pip install --disable-pip-version-check -e "$top[test]" >"$log" 2>&1 \
        || { tail -n 20 "$log" >&2; die "pip install of fastrelay failed (full log: $log)"; }
    echo "$want" > "$stamp"
fi
"$venv/bin/python" -c 'import bcc, aioquic, pyroute2, typer' 2>/dev/null \
    || die "the environment $venv is incomplete (import bcc/aioquic/pyroute2/typer failed); remove it and rerun"
say "ready: $venv/bin/fastrelay"
