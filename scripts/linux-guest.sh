#!/usr/bin/env bash
# Builds a Linux guest for the reference VMM from Debian packages:
#   OUTDIR/vmlinuz   the distribution's bzImage (cloud flavour)
#   OUTDIR/vmlinux   the ELF kernel extracted from it (PVH note, 64-bit entry)
#   OUTDIR/initrd    a busybox initramfs whose /init prints a marker and reboots
#
# Usage: scripts/linux-guest.sh OUTDIR
# Then:  cargo run --example minimal -- --kernel OUTDIR/vmlinux --initrd OUTDIR/initrd
#        VMM_KIT_LINUX_KERNEL=OUTDIR/vmlinux VMM_KIT_LINUX_INITRD=OUTDIR/initrd \
#            cargo test --test linux_boot -- --nocapture
set -euo pipefail

out=${1:?usage: $0 OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need cpio cpio
need lz4 lz4
need zstd zstd
need xz xz-utils

cd "$work"
image_pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$image_pkg" ]; then
    apt-get update -qq
    image_pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
echo "kernel package: $image_pkg"
apt-get download -qq "$image_pkg" busybox-static
dpkg-deb -x linux-image-*.deb kernel
dpkg-deb -x busybox-static_*.deb busybox
cp kernel/boot/vmlinuz-* "$out/vmlinuz"

# The bzImage's payload (setup header: payload_offset at 0x248, payload_length
# at 0x24c, from the start of the protected-mode code) is a compressed vmlinux.
python3 - "$out/vmlinuz" payload <<'PY'
import struct, sys
d = open(sys.argv[1], 'rb').read()
setup_sects = d[0x1f1] or 4
offset, length = struct.unpack_from('<II', d, 0x248)
start = (setup_sects + 1) * 512 + offset
open(sys.argv[2], 'wb').write(d[start:start + length])
PY
# The kernel appends the uncompressed size after the stream, which the
# decompressors report as trailing garbage: judge by the ELF magic instead.
case "$(head -c 4 payload | od -An -tx1 | tr -d ' ')" in
    02214c18) lz4 -dc payload > "$out/vmlinux" 2>/dev/null || true ;;
    28b52ffd) zstd -dcq payload > "$out/vmlinux" 2>/dev/null || true ;;
    fd377a58) xz -dc payload > "$out/vmlinux" 2>/dev/null || true ;;
    1f8b*) gzip -dc payload > "$out/vmlinux" 2>/dev/null || true ;;
    *) echo "unknown payload compression" >&2; exit 1 ;;
esac
if [ "$(head -c 4 "$out/vmlinux" | od -An -tx1 | tr -d ' ')" != "7f454c46" ]; then
    echo "could not extract vmlinux from the bzImage" >&2
    exit 1
fi

mkdir -p root/bin root/proc root/sys root/dev
cp busybox/bin/busybox root/bin/busybox
cat > root/init <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "vmm-kit linux guest: init running on $(/bin/busybox uname -r)"
/bin/busybox reboot -f
INIT
chmod +x root/init
(cd root && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initrd"
ls -la "$out"
