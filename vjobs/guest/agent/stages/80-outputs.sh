# Outputs: shell globs relative to the working directory, one per line; a matched folder comes back whole.
cd /scratch/work
: > /run/vjobs/outputs
while IFS= read -r pattern; do
    IFS=$newline
    for match in $pattern; do
        if [ -e "$match" ] || [ -L "$match" ]; then
            echo "work/${match#./}" >> /run/vjobs/outputs
        fi
    done
    unset IFS
done < "$job/outputs"
# Read-write binds come back whole; the host copies what changed into the host folder.
while read -r number target; do
    [ -n "$target" ] && echo "binds/$number" >> /run/vjobs/outputs
done < "$job/rw_binds"
sort -u /run/vjobs/outputs -o /run/vjobs/outputs
cd /
