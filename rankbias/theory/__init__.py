"""The theory made executable: the rank bound, the unrolled update, the theorem's checks."""
