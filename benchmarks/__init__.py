"""Benchmarks of moss-agent against the alternatives: ``python -m benchmarks.run [--quick] [--json PATH]``.

Every comparison runs both paths on the same model object, greedy, with the same prompts and the same number
of new tokens, and asserts that their outputs are identical token for token before any figure is reported.
"""
