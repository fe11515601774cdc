scripts/_gc_local.sh: line 55: 11: Bad file descriptor
