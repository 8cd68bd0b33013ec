#!/bin/sh
# A long guest job for checkpoint tests: STEPS steps of busy work. After each step it
# appends "step N" to out, writes its fraction done and an operations count. A run
# restored from a checkpoint continues where the snapshot was; repeated or lost steps
# would show in out, whose last line is the sum of the step numbers.
STEPS=${1:-20}
WORK=${2:-4000}
BULK=${3:-0}
: > out
i=1
sum=0
while [ "$i" -le "$STEPS" ]; do
    j=0
    while [ "$j" -lt "$WORK" ]; do j=$((j + 1)); done
    echo "step $i" >> out
    sum=$((sum + i))
    echo "$i $STEPS" | awk '{ printf "%.4f\n", $1 / $2 }' > fraction_done
    echo $((i * 1000000000)) > credit_report
    i=$((i + 1))
done
echo "sum $sum" >> out
if [ "$BULK" -gt 0 ]; then
    dd if=/dev/zero of=bulk bs=1024 count="$BULK" 2>/dev/null
fi
