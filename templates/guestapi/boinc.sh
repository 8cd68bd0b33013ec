#!/bin/sh
# boinc: boincvm's guest-side BOINC API for shell scripts (POSIX sh; busybox ash is enough).
# It speaks to the boincvm wrapper through files in $BOINCVM_API_DIR, as the C library does.
#
#   boinc fraction-done 0.3          boinc ops-cumulative FPOPS [OPS]
#   boinc time-to-checkpoint         exit 0 when a checkpoint is due (enters a critical section)
#   boinc checkpoint-completed       waits until the wrapper has taken its checkpoint
#   boinc begin-critical | end-critical   (no nesting: one shell, one section)
#   boinc resolve NAME               prints the guest path of logical file NAME
#   boinc trickle-up VARIETY TEXT    boinc trickle-down (prints the oldest; exit 1 if none)
#   boinc temporary-exit DELAY REASON [--notice]     then: exit 0
#   boinc finish STATUS [MESSAGE]    then: exit STATUS (the command exits with STATUS too)
#   boinc standalone                 exit 0 when no wrapper is there
#   boinc waiting-for-network 1|0    say the program waits for the network (or no longer)
#   boinc network-suspended          exit 0 while the client keeps the network off
# The status file this command writes holds what the last call said: call fraction-done
# and ops-cumulative with the values you want reported together, or one of them alone.
set -u
dir=${BOINCVM_API_DIR:-}
[ -n "$dir" ] && [ -d "$dir" ] || dir=
cmd=${1:-}
[ $# -gt 0 ] && shift

put() { # NAME TEXT: write through NAME.tmp and a rename
    printf '%s' "$2" > "$dir/$1.tmp" && mv -f "$dir/$1.tmp" "$dir/$1"
}
status_set() { # KEY VALUE: keep the other keys of the status file
    old=
    [ -f "$dir/status" ] && old=$(grep -v "^$1=" "$dir/status")
    if [ -n "$old" ]; then put status "$old
$1=$2
"; else put status "$1=$2
"; fi
}
number() {
    case $1 in ''|*[!0-9.eE+-]*) echo "boinc: not a number: $1" >&2; exit 2 ;; esac
}

case $cmd in
standalone) [ -z "$dir" ] ;;
resolve)
    name=${1:?usage: boinc resolve NAME}
    if [ -n "$dir" ] && [ -f "$dir/resolve" ]; then
        tab=$(printf '\t')
        while IFS= read -r line; do
            case $line in "$name$tab"*) printf '%s\n' "${line#"$name$tab"}"; exit 0 ;; esac
        done < "$dir/resolve"
    fi
    printf '%s\n' "$name" ;;
fraction-done)
    number "${1:-}"; [ -n "$dir" ] && status_set fraction_done "$1"; exit 0 ;;
ops-cumulative)
    number "${1:-}"; [ -n "$dir" ] || exit 0
    status_set fpops_cumulative "$1"
    [ $# -gt 1 ] && { number "$2"; status_set ops_cumulative "$2"; }
    exit 0 ;;
time-to-checkpoint)
    [ -n "$dir" ] || exit 1
    grep -q '^uses_checkpoints=1' "$dir/status" 2>/dev/null || status_set uses_checkpoints 1
    [ -e "$dir/critical" ] && exit 1
    [ -e "$dir/checkpoint_request" ] || exit 1
    put critical "1
" ;;
checkpoint-completed)
    [ -n "$dir" ] || exit 0
    rm -f "$dir/critical"
    [ -f "$dir/checkpoint_request" ] || exit 0
    cat "$dir/checkpoint_request" > "$dir/checkpoint_ready.tmp" && mv -f "$dir/checkpoint_ready.tmp" "$dir/checkpoint_ready"
    while [ -e "$dir/checkpoint_request" ]; do sleep 0.05 2>/dev/null || sleep 1; done
    rm -f "$dir/checkpoint_ready" ;;
begin-critical) [ -z "$dir" ] || put critical "1
" ;;
end-critical) [ -z "$dir" ] || rm -f "$dir/critical" ;;
trickle-up)
    variety=${1:?usage: boinc trickle-up VARIETY TEXT}; text=${2:-}
    [ -n "$dir" ] || exit 0
    mkdir -p "$dir/trickle_up"
    seq=0
    for f in "$dir"/trickle_up/*; do
        n=${f##*/}; n=${n%%.*}
        case $n in ''|*[!0-9]*) continue ;; esac
        n=$(expr "$n" + 0); [ "$n" -gt "$seq" ] && seq=$n
    done
    put "trickle_up/$(printf '%08d' $((seq + 1))).msg" "$variety
$text" ;;
trickle-down)
    [ -n "$dir" ] && [ -d "$dir/trickle_down" ] || exit 1
    for f in "$dir"/trickle_down/*; do
        case ${f##*/} in .*|*.tmp) continue ;; esac
        [ -f "$f" ] || continue
        cat "$f" && rm -f "$f"; exit 0
    done
    exit 1 ;;
temporary-exit)
    delay=${1:?usage: boinc temporary-exit DELAY REASON [--notice]}; reason=${2:-}; notice=0
    [ "${3:-}" = --notice ] && notice=1
    number "$delay"
    [ -z "$dir" ] || put temporary_exit "$delay
$notice
$reason
"
    exit 0 ;;
finish)
    st=${1:?usage: boinc finish STATUS [MESSAGE]}
    case $st in ''|*[!0-9-]*) echo "boinc: not a status: $st" >&2; exit 2 ;; esac
    if [ -n "$dir" ]; then
        if [ $# -gt 1 ]; then put finish "$st
$2
"; else put finish "$st
"; fi
    fi
    exit "$st" ;;
waiting-for-network)
    case ${1:-} in 1) [ -z "$dir" ] || status_set want_network 1 ;;
    0) [ -z "$dir" ] || status_set want_network 0 ;;
    *) echo "usage: boinc waiting-for-network 1|0" >&2; exit 2 ;; esac
    exit 0 ;;
network-suspended) [ -n "$dir" ] && [ -e "$dir/network_suspended" ] ;;
*) echo "usage: boinc COMMAND [ARGS] (see the comment at the top of this script)" >&2; exit 2 ;;
esac
