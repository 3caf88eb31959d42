#!/usr/bin/env bash
# Files too large for one device call (a call carries at most 64 MiB with the working tree), taken over in parts,
# one part per call, while the device machine stays warm between the calls:
#
#   here:   benchmarks/gpu_stage.sh split FILE PREFIX [PART_MIB]   # PREFIX1/, PREFIX2/, ...: one part each (default 40 MiB)
#   there:  benchmarks/gpu_stage.sh take PREFIXn                   # in call n (carrying PREFIXn): copy its part to $STAGE
#           benchmarks/gpu_stage.sh join NAME                      # once all parts are there: $STAGE/NAME, sha256 checked
#
# $STAGE is outside the working tree (default /tmp/mixerswap-stage): what a call writes there stays for the next
# call on the same machine, and is gone with it. Every part folder also holds NAME.parts (the part names and the
# whole file's sha256), so `join` knows when it has them all and refuses a file that does not match.
set -euo pipefail
stage=${STAGE:-/tmp/mixerswap-stage}
usage="usage: gpu_stage.sh split FILE PREFIX [PART_MIB] | take DIR | join NAME"
case ${1:-} in
    split)
        file=${2:?$usage} prefix=${3:?$usage} mib=${4:-40}
        name=$(basename "$file")
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        split -b "${mib}M" -d -a 2 "$file" "$tmp/$name.part"
        { sha256sum "$file" | cut -d' ' -f1; (cd "$tmp" && ls "$name".part[0-9]*); } >"$tmp/$name.parts"
        n=0
        for part in "$tmp/$name".part[0-9]*; do
            n=$((n + 1))
            rm -rf "$prefix$n" && mkdir -p "$prefix$n"
            mv "$part" "$prefix$n/" && cp "$tmp/$name.parts" "$prefix$n/"
            echo "$prefix$n: $(basename "$part") ($(du -h "$prefix$n" | cut -f1)) - carry it in call $n"
        done ;;
    take)
        dir=${2:?$usage}
        mkdir -p "$stage"
        cp "$dir"/* "$stage/"
        echo "staged $(ls "$dir" | tr '\n' ' ')in $stage" ;;
    join)
        name=${2:?$usage}
        list="$stage/$name.parts"
        [ -f "$list" ] || { echo "gpu_stage.sh: no part of $name in $stage yet: take its parts first" >&2; exit 1; }
        missing=$(tail -n +2 "$list" | while read -r part; do [ -f "$stage/$part" ] || echo "$part"; done)
        [ -z "$missing" ] || { echo "gpu_stage.sh: $name still lacks $(echo $missing): take those calls' parts" >&2; exit 1; }
        tail -n +2 "$list" | sed "s|^|$stage/|" | xargs cat >"$stage/$name.tmp"
        [ "$(sha256sum "$stage/$name.tmp" | cut -d' ' -f1)" = "$(head -1 "$list")" ] \
            || { rm -f "$stage/$name.tmp"; echo "gpu_stage.sh: $name's parts do not join to the file split (sha256)" >&2; exit 1; }
        mv "$stage/$name.tmp" "$stage/$name"
        echo "$stage/$name" ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
