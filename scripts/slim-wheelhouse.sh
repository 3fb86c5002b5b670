#!/usr/bin/env bash
# Repacks the GPU wheelhouse that ../shared/gpu/build-wheelhouse.sh wrote (4 parts) into 3 parts,
# so installing vLLM on a fresh device machine takes three calls instead of four.
#
#   usage: scripts/slim-wheelhouse.sh [SRC_DIR] [OUT_DIR]      (default: .gpu .gpu3)
#
# What it leaves out of vLLM, none of which the benchmarks or tests load: the Rust front end
# (vllm-rs, 41 MB; used only with VLLM_USE_RUST_FRONTEND=1), the Blackwell-only attention sources
# (third_party/fmha_sm100) and DeepGEMM's builds for Pythons other than 3.12. vLLM is then
# recompressed at zstd level 19 with a 128 MB window (python-zstandard's default limit, so the
# unchanged install.sh decompresses it). Part 0 is smaller because its call also carries the
# zstandard wheel; every call must stay under 64 MiB together with the repository's files.
set -euo pipefail
SRC=${1:-.gpu}
OUT=${2:-.gpu3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
source "$SRC/bundle.layout"
cat $(ls "$SRC"/part[0-9] | sort) > "$WORK/bundle.old"
[ "$(sha256sum "$WORK/bundle.old" | cut -d' ' -f1)" = "$(cat "$SRC/bundle.sha256")" ] \
  || { echo "$SRC: parts do not match bundle.sha256; rebuild it with ../shared/gpu/build-wheelhouse.sh" >&2; exit 1; }
mkdir -p "$WORK/vllm" "$OUT"
head -c "$vllm_tar_zst_bytes" "$WORK/bundle.old" | zstd -dc | tar xf - -C "$WORK/vllm"
tail -c +"$((vllm_tar_zst_bytes + 1))" "$WORK/bundle.old" > "$WORK/deps.tar"
rm -f "$WORK/bundle.old"
rm -rf "$WORK/vllm/vllm/vllm-rs" "$WORK/vllm/vllm/third_party/fmha_sm100"
find "$WORK/vllm/vllm/third_party/deep_gemm" -maxdepth 1 -name '_C.cpython-*.so' ! -name '*-312-*' -delete
echo "recompressing vLLM (about 80 s on 2 cores)"
tar cf - --sort=name -C "$WORK/vllm" . | zstd -q -T0 -19 --long=27 -o "$WORK/vllm.tar.zst"
cat "$WORK/vllm.tar.zst" "$WORK/deps.tar" > "$WORK/bundle"
rm -f "$OUT"/part* "$OUT"/bundle.*
echo "vllm_tar_zst_bytes=$(stat -c %s "$WORK/vllm.tar.zst")" > "$OUT/bundle.layout"
sha256sum "$WORK/bundle" | cut -d' ' -f1 > "$OUT/bundle.sha256"
total=$(stat -c %s "$WORK/bundle")
first=$((52 * 1000 * 1000))
rest=$(((total - first + 1) / 2))
slice() { dd if="$WORK/bundle" of="$OUT/$1" bs=1M iflag=skip_bytes,count_bytes skip="$2" count="$3" status=none; }
slice part0 0 "$first"
slice part1 "$first" "$rest"
slice part2 "$((first + rest))" "$((total - first - rest))"
cp "$SRC"/zstandard-*.whl "$SRC/install.sh" "$OUT/"
ls -l "$OUT"
