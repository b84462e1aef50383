#!/bin/bash
# Build the Linux guest kernel and initramfs that veil's tests boot.
#
#   dir=$(resources/linux/build.sh | tail -1)
#
# Outputs, in ${VEIL_CACHE:-$HOME/.cache/veil}/linux-<key>/:
#   vmlinux         ELF kernel with a PVH note (uncompressed, boots fastest)
#   bzImage         the same kernel, LZ4-compressed, Linux boot protocol
#   initramfs.cpio  uncompressed newc cpio: busybox-static, a few applet
#                   symlinks, /bin/veil-exit, /dev/console, ./init
#   config          the kernel .config used
#   inputs.txt      what <key> was computed from
#   build.log       the full build log
# <key> is a hash of every input (see key_material below).  A complete entry
# is reused as is; an entry appears only complete (built in a temporary
# directory beside it, then renamed).  Progress and logs go to stderr; the
# last line on stdout is the cache directory.
#
# Packages it needs are installed with apt-get when missing.
set -euo pipefail

# All output goes to stderr except the final path, written to the real stdout.
exec 3>&1 1>&2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${VEIL_CACHE:-$HOME/.cache/veil}
src_tar=/usr/src/linux-source-6.1.tar.xz
src_dir_name=linux-source-6.1

log() { printf 'linux/build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- 1. packages --------------------------------------------------------------
packages=(linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev
	cpio busybox-static lz4 xz-utils)
missing=()
for p in "${packages[@]}"; do
	status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
	[ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	log "installing missing packages: ${missing[*]}"
	sudo=
	if [ "$(id -u)" != 0 ]; then
		command -v sudo >/dev/null || die "not root and no sudo: install ${missing[*]}"
		sudo=sudo
	fi
	$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
	$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		--no-install-recommends "${missing[@]}"
fi
[ -f "$src_tar" ] || die "$src_tar missing although linux-source-6.1 is installed"

# --- 2. cache key -------------------------------------------------------------
patches=("$here"/patches/*.patch)
[ -f "${patches[0]}" ] || die "no patches in $here/patches"

key_material() {
	echo "linux-source-6.1 $(dpkg-query -W -f='${Version}' linux-source-6.1)"
	echo "busybox-static $(dpkg-query -W -f='${Version}' busybox-static)"
	echo "compiler $(gcc --version | head -1)"
	local f
	for f in build.sh veil.config init veil-exit.c "${patches[@]#"$here"/}"; do
		echo "file $f $(sha256sum <"$here/$f" | cut -d' ' -f1)"
	done
}
inputs=$(key_material)
key=$(printf '%s\n' "$inputs" | sha256sum | cut -c1-16)
final=$cache_root/linux-$key
outputs=(vmlinux bzImage initramfs.cpio)

entry_complete() {
	local f
	[ -f "$1/.complete" ] || return 1
	for f in "${outputs[@]}"; do [ -s "$1/$f" ] || return 1; done
}

if entry_complete "$final"; then
	log "cache hit: $final"
	echo "$final" >&3
	exit 0
fi

# --- 3. build in a temporary directory beside the entry -----------------------
mkdir -p "$cache_root"
# Leftovers of builds killed hard (no trap ran) more than a day ago.
find "$cache_root" -maxdepth 1 -name '.linux-*' -mmin +1440 -exec rm -rf {} + 2>/dev/null || true
work=$(mktemp -d "$cache_root/.linux-$key.XXXXXX")
out=$work/out
mkdir "$out"
build_log=$out/build.log
failed_log=$cache_root/linux-$key.failed.log

on_exit() {
	local rc=$?
	if [ $rc -ne 0 ] && [ -f "$build_log" ]; then
		cp "$build_log" "$failed_log" 2>/dev/null || true
		log "build failed (exit $rc); last lines of the log (all of it: $failed_log):"
		tail -n 40 "$build_log" >&2 || true
	fi
	rm -rf "$work"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# Run a step with its output in the build log.
step() {
	local what=$1
	shift
	log "$what"
	printf '\n==== %s\n' "$what" >>"$build_log"
	"$@" >>"$build_log" 2>&1
}

start=$(date +%s)
log "building $final (log: $build_log while building)"
printf '%s\n' "$inputs" >"$out/inputs.txt"

src=$work/$src_dir_name
step "extracting $src_tar" tar -xf "$src_tar" -C "$work"
[ -d "$src" ] || die "$src_tar did not contain $src_dir_name/"

for p in "${patches[@]}"; do
	step "applying patches/$(basename "$p")" patch -d "$src" -p1 --forward --batch -i "$p"
done

# Reproducible version banner (no host name, user or build date).
export KBUILD_BUILD_USER=veil KBUILD_BUILD_HOST=veil
export KBUILD_BUILD_TIMESTAMP="linux-source-6.1 $(dpkg-query -W -f='${Version}' linux-source-6.1)"
kmake() { make -C "$src" "$@"; }

step "make tinyconfig" kmake tinyconfig
cat "$here/veil.config" >>"$src/.config"
step "make olddefconfig (1)" kmake olddefconfig
step "make olddefconfig (2)" kmake olddefconfig

# Every option in the fragment must have ended up exactly as asked.
verify_config() {
	awk '
	FNR == NR {
		if ($0 ~ /^CONFIG_[A-Za-z0-9_]+=/) {
			i = index($0, "="); k = substr($0, 1, i - 1); v = substr($0, i + 1)
		} else if ($0 ~ /^# CONFIG_[A-Za-z0-9_]+ is not set$/) {
			k = $2; v = "n"
		} else
			next
		if (v == "n") v = "(not set)"
		want[k] = v; order[++n] = k
		next
	}
	/^CONFIG_[A-Za-z0-9_]+=/ { i = index($0, "="); have[substr($0, 1, i - 1)] = substr($0, i + 1) }
	END {
		bad = 0
		for (j = 1; j <= n; j++) {
			k = order[j]; h = (k in have) ? have[k] : "(not set)"
			if (h != want[k]) {
				printf "linux/build.sh: config: %s wanted %s, got %s\n", k, want[k], h
				bad++
			}
		}
		printf "linux/build.sh: config: %d options of veil.config checked, %d not as asked\n", n, bad
		exit bad ? 1 : 0
	}' "$1" "$2" >&2
}
verify_config "$here/veil.config" "$src/.config" ||
	die "the kernel config does not match veil.config (see above)"
cp "$src/.config" "$out/config"

step "make -j$(nproc) vmlinux bzImage" kmake -j"$(nproc)" vmlinux bzImage
cp "$src/vmlinux" "$out/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$out/bzImage"

# --- 4. initramfs ---------------------------------------------------------------
# gen_init_cpio (from the kernel tree) writes the archive from a list, so no
# root rights are needed for /dev/console and ownership is root everywhere.
step "building gen_init_cpio" gcc -O2 -o "$work/gen_init_cpio" "$src/usr/gen_init_cpio.c"
# veil-exit: freestanding (no libc), so it stays one page of code.
step "building veil-exit" gcc -Os -static -nostdlib -ffreestanding -fno-stack-protector \
	-fno-asynchronous-unwind-tables -fno-pie -no-pie -Wall -Wextra -Werror -s \
	-o "$work/veil-exit" "$here/veil-exit.c"
busybox=/bin/busybox
[ -x "$busybox" ] || die "$busybox missing although busybox-static is installed"
list=$work/initramfs.list
applets=(bin/sh bin/mount bin/umount bin/ls bin/cat bin/echo bin/mkdir bin/ln
	bin/sleep bin/grep bin/dmesg bin/uname sbin/poweroff sbin/reboot sbin/halt)
all_applets=$("$busybox" --list-full)
{
	echo "dir /dev 0755 0 0"
	echo "nod /dev/console 0600 0 0 c 5 1"
	echo "nod /dev/null 0666 0 0 c 1 3"
	for d in /proc /sys /tmp /mnt /root /bin /sbin /usr /usr/bin /usr/sbin; do
		if [ "$d" = /tmp ]; then echo "dir $d 1777 0 0"; else echo "dir $d 0755 0 0"; fi
	done
	echo "file /bin/busybox $busybox 0755 0 0"
	echo "file /bin/veil-exit $work/veil-exit 0755 0 0"
	# Symlinks for a few applets only: each cpio entry costs ~25 ms of
	# emulated CPL0 work while the kernel unpacks it (a link for all ~270
	# applets added ~7 s to the boot).  Debian's busybox sh runs every other
	# applet by name anyway (FEATURE_SH_STANDALONE, once /proc is mounted).
	for applet in "${applets[@]}"; do
		grep -qx "$applet" <<<"$all_applets" || die "busybox has no applet $applet"
		echo "slink /$applet /bin/busybox 0777 0 0"
	done
	echo "file /init $here/init 0755 0 0"
} >"$list"
step "writing initramfs.cpio ($(wc -l <"$list") entries)" \
	sh -c '"$1" -t 0 "$2" >"$3"' sh "$work/gen_init_cpio" "$list" "$out/initramfs.cpio"
[ "$(head -c 6 "$out/initramfs.cpio")" = 070701 ] || die "initramfs.cpio is not an uncompressed newc cpio"

# --- 5. publish atomically ------------------------------------------------------
(cd "$out" && sha256sum "${outputs[@]}" config >SHA256SUMS)
log "built in $(($(date +%s) - start)) s"
touch "$out/.complete"
rm -f "$failed_log"
if ! mv -T "$out" "$final" 2>/dev/null; then
	# Someone else published first, or a broken entry is in the way.
	if ! entry_complete "$final"; then
		rm -rf "$final"
		mv -T "$out" "$final"
	fi
fi
echo "$final" >&3
