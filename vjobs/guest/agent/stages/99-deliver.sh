# The results onto the io disk, then power off.
deliver ""
