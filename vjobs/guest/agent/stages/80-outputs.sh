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
sort -u /run/vjobs/outputs -o /run/vjobs/outputs
cd /
