"""The command line: every click command, each importing what it needs when it runs."""
