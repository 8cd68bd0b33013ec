#!/bin/sh
# apijob: a job in the shape of BOINC's upper_case sample that speaks boincvm's guest API
# files by hand (busybox only), for guests without the guest library:
#   apijob.sh STEPS STEP_SECONDS FINISH_STATUS TRICKLE_AT
# It resolves its output's logical name "out", resumes from its checkpoint file "ck" if
# present, and per step appends "step N" to the output, writes its status (fraction done,
# operations), and checkpoints when the wrapper asks (checkpoint_request): it saves "ck",
# says checkpoint_ready and waits until the request is gone. At step TRICKLE_AT it sends a
# trickle-up message. It ends with finish FINISH_STATUS and exits with that status.
STEPS=${1:-12}
STEP=${2:-1}
FINISH=${3:-0}
TRICKLE_AT=${4:-0}
A=${BOINCVM_API_DIR:?standalone mode is not supported by this sample}
put() { printf "$2" > "$A/$1.tmp" && mv "$A/$1.tmp" "$A/$1"; }
status() {
    f=$(echo "$1 $STEPS" | awk '{ printf "%.4f", $1 / $2 }')
    put status "fraction_done=$f\nfpops_cumulative=$(($1 * 1000000000))\nuses_checkpoints=1\n"
}

out=$(awk -F '\t' '$1 == "out" { print $2 }' "$A/resolve")
[ -n "$out" ] || out=out
i=0
sum=0
if [ -f ck ]; then read -r i sum < ck; else : > "$out"; fi
status "$i"
while [ "$i" -lt "$STEPS" ]; do
    sleep "$STEP"
    i=$((i + 1))
    sum=$((sum + i))
    echo "step $i" >> "$out"
    status "$i"
    if [ "$i" -eq "$TRICKLE_AT" ]; then
        n=$(printf %08d "$i")
        printf 'progress\n<step>%d</step>\n' "$i" > "$A/trickle_up/$n.msg.tmp"
        mv "$A/trickle_up/$n.msg.tmp" "$A/trickle_up/$n.msg"
    fi
    if [ -f "$A/checkpoint_request" ] && [ ! -f "$A/critical" ]; then
        echo "$i $sum" > ck.tmp && mv ck.tmp ck
        read -r req < "$A/checkpoint_request"
        put checkpoint_ready "$req\n"
        while [ -f "$A/checkpoint_request" ]; do sleep 0.05; done
        rm -f "$A/checkpoint_ready"
    fi
done
echo "sum $sum" >> "$out"
put finish "$FINISH\n"
exit "$FINISH"
