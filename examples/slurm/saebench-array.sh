#!/usr/bin/env bash
# One suite as a Slurm job array: task I of N runs shard I/N of the checks (a balanced share,
# whole prefix groups), each on its own GPU, into its own run directory; a dependent job
# merges them into one run directory, row for row what a serial run writes.
#
#   sbatch examples/slurm/saebench-array.sh            # submits the array and the merge
#
#SBATCH --job-name=saebench
#SBATCH --array=1-8                 # shards are numbered 1..N: start the array at 1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=logs/saebench-%A-%a.out
set -euo pipefail

SUITE=${SUITE:-suites/my_saes.yaml}
OUT=${OUT:-reports/slurm-${SLURM_ARRAY_JOB_ID}}

status=0   # a failed check exits 1: keep going, so the merge is still submitted
saebench run "$SUITE" --shard "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT" \
  --saebench-device cuda --saebench-report-dir "$OUT/shards/$SLURM_ARRAY_TASK_ID" || status=$?

# task N submits the merge, which waits until every task of the array has ended (any state)
if [[ "$SLURM_ARRAY_TASK_ID" == "$SLURM_ARRAY_TASK_MAX" ]]; then
  sbatch --dependency="afterany:${SLURM_ARRAY_JOB_ID}" --job-name=saebench-merge \
    --output="logs/saebench-merge-%j.out" \
    --wrap="saebench merge $OUT/shards/*/*/ -o $OUT/merged"
fi
exit "$status"
