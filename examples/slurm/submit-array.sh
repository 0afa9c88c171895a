#!/bin/sh
# Submits vjobs job files as one Slurm job array, one VM per task:
#
#   submit-array.sh [-m MAX_RUNNING] OUTDIR JOB_FILE...      prints the array's job id
#
# Writes OUTDIR/jobs.txt (the job files, one absolute path per line: line i is array task i) and runs
# `sbatch --array=1-N%M vjobs-job.sbatch OUTDIR/jobs.txt OUTDIR`, with each task's Slurm log in
# OUTDIR/slurm-ARRAYID_TASK.out. Other sbatch options through sbatch's own variables (SBATCH_PARTITION,
# SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...); -c and --mem are in vjobs-job.sbatch.
set -eu
max=
while getopts m: option; do
    case $option in
        m) max=$OPTARG ;;
        *) echo "usage: $0 [-m MAX_RUNNING] OUTDIR JOB_FILE..." >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ $# -lt 2 ]; then
    echo "usage: $0 [-m MAX_RUNNING] OUTDIR JOB_FILE..." >&2
    exit 2
fi
outdir=$(mkdir -p "$1" && cd "$1" && pwd)
shift
: > "$outdir/jobs.txt"
for job in "$@"; do
    realpath -e "$job" >> "$outdir/jobs.txt"
done
count=$#
here=$(cd "$(dirname "$0")" && pwd)
exec sbatch --parsable --array="1-$count%${max:-$count}" --output="$outdir/slurm-%A_%a.out" \
    "$here/vjobs-job.sbatch" "$outdir/jobs.txt" "$outdir"
