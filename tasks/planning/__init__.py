"""Planning: what each node of a workflow needs in memory, FLOPs and time, from model configs alone."""
