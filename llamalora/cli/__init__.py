"""The `llamalora` command line: thin Typer commands over the core modules."""
