"""Where the runs of a sweep are trained: local worker processes, or a Ray cluster.

Both take a `TaskQueue` (tasks handed out as workers free up, every run claimed in the
store first) and a `record` callback through which every result reaches the driver,
the only process that writes the store.
"""
