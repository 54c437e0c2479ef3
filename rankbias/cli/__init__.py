"""The command line: argument parsing, command bodies, flags generated from RunConfig."""
