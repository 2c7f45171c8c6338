"""The ``lp-fx`` subcommands, one module each: its arguments (``register``) and its run (``run``)."""
