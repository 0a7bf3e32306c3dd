#!/usr/bin/env bash
# Upload benchmark (issue 3): recvault's S3 delivery vs `rclone copyto`, same
# 1 GiB file, same local s3s-fs server, alternating runs; peak RSS of each
# client alone; a 4 GiB file for ours; intake hash vs `openssl dgst -sha256`.
# Installs rclone (Debian package) if missing, then runs the cargo bench.
#
#   deploy/bench/upload-vs-rclone.sh
#   BENCH_RUNS=5 BENCH_BIG_MIB=0 deploy/bench/upload-vs-rclone.sh   # see uploader/benches/delivery.rs
#
# Needs about 3 × BENCH_BIG_MIB of free disk under target/ (file, parts,
# object); everything is deleted at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v rclone >/dev/null; then
    echo "installing rclone (Debian package)" >&2
    if [ "$(id -u)" -eq 0 ]; then
        apt-get install -y rclone >/dev/null || { apt-get update >/dev/null && apt-get install -y rclone >/dev/null; }
    else
        sudo apt-get install -y rclone >/dev/null
    fi
fi
command -v openssl >/dev/null || { echo "openssl is needed" >&2; exit 1; }

# Machine facts for the record: the figures depend on them.
echo "# $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# $(rclone version | head -1), $(openssl version)"
exec cargo bench -p recvault-uploader --bench delivery
