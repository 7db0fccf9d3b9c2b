"""Mutants as tests of the tests (issue 21): every row of the README's Fidelity table is pinned by tests that fail
when the behaviour the row describes is changed. ``mutants.py`` declares the changes (the table), ``python -m
tests.fidelity`` (``make fidelity``) applies each to a scratch copy of the repository and runs only the tests that
must catch it; ``test_mutant_table.py`` (in the normal suite) keeps the table well-formed."""
