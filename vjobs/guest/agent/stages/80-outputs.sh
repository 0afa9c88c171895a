# Outputs: shell globs relative to the working directory, one per line; a matched folder comes back whole.
match_outputs > /run/vjobs/outputs
# Read-write binds come back whole; the host copies what changed into the host folder.
while read -r number target; do
    [ -n "$target" ] && echo "binds/$number" >> /run/vjobs/outputs
done < "$job/rw_binds"
sort -u /run/vjobs/outputs -o /run/vjobs/outputs
# The results onto the io disk, then power off.
deliver ""
