"""The `splice` command line: thin commands that parse, call the library, print and plot."""
