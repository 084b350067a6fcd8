"""Training: optimizer, state, step, loop and the `python -m lm.train` command."""
