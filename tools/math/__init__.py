"""Safe math for Calculate and Solve: an ``ast`` check, sympy evaluation, a time-bounded worker, the tool base."""
