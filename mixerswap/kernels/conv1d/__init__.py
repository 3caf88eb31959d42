"""See naive.py: the reference implementation is the specification."""
