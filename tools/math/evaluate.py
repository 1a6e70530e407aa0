"""Evaluation of checked math trees with sympy: the calculator's numbers and the solver's equations.

Runs inside the worker process of :mod:`moss_agent.tools.math.worker` (it imports sympy). Trees come from
:mod:`moss_agent.tools.math.check` and are checked again here, so this module never sees an unchecked node.

Numbers follow Python's rules, which is what the recorded MOSS calculator printed: integers stay exact
(``12*3`` -> ``36``), ``/`` and the functions give floats (``20/2`` -> ``10.0``, ``sqrt(100)`` -> ``10.0``),
and every float is an IEEE double, rounded after each step (``400*(1-0.45)`` -> ``220.00000000000003``).
The arithmetic is sympy's (exact integers and rationals, correctly rounded 53-bit Floats). In the solver,
numbers follow the same rules and variables are sympy Symbols, so ``x/4`` stays exact while ``(4/3)x``
carries a float, as in the recorded solver.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from typing import Any

import sympy as sp

from .check import (
    CALC_CONSTANTS,
    SOLVER_CONSTANTS,
    MathInputError,
    MathLimits,
    limits_from,
    parse_calculation,
    parse_equations,
)

Value = Any  # sympy Integer or Float (a number), or any other sympy expression (symbolic)

_DOUBLE_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _is_num(value: Value) -> bool:
    return isinstance(value, (sp.Integer, sp.Float))


def _double(value: Value) -> sp.Float:
    """``float(value)``: one correctly rounded IEEE double, as a sympy Float."""
    try:
        as_float = float(value)
    except (OverflowError, TypeError) as err:
        raise MathInputError("number too large for a float") from err
    if not math.isfinite(as_float):
        raise MathInputError("number too large for a float")
    return sp.Float(as_float, precision=53)


def _real(value: Value) -> sp.Float:
    """A function result that must be a real double, else the domain error Python's math would raise."""
    if not isinstance(value, sp.Float):
        raise MathInputError("math domain error")
    return _double(value)


class Evaluator:
    """Builds the value of a checked tree: numbers by Python's rules, variables as sympy Symbols."""

    def __init__(self, limits: MathLimits, constants: frozenset[str], names: dict[str, Value]) -> None:
        self.limits = limits
        self.constants = constants
        self.names = names
        self.max_bits = limits.max_int_bits

    def __call__(self, node: ast.expr) -> Value:
        """The value of a checked expression node (exact integers under the limits, else doubles)."""
        if isinstance(node, ast.Constant):
            return self._int(node.value) if isinstance(node.value, int) else _double(node.value)
        if isinstance(node, ast.Name):
            if node.id in self.constants:
                return _double(_DOUBLE_CONSTANTS[node.id])
            return self.names.setdefault(node.id, sp.Symbol(node.id))
        if isinstance(node, ast.UnaryOp):
            value = self(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            left, right = self(node.left), self(node.right)
            if _is_num(left) and _is_num(right):
                return self._numeric(node.op, left, right)
            return self._symbolic(node.op, left, right)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            args = [self(arg) for arg in node.args]
            if all(_is_num(arg) for arg in args):
                return self._int_or_double(_NUMERIC[node.func.id](self, *args))
            if node.func.id not in _SYMBOLIC:
                raise MathInputError(f"{node.func.id}() needs numbers")
            return _SYMBOLIC[node.func.id](*args)
        raise MathInputError(f"unsupported syntax: {type(node).__name__}")  # checked trees never get here

    def _int(self, value: int) -> sp.Integer:
        if abs(value).bit_length() > self.max_bits:
            raise MathInputError(f"integer with more than {self.limits.max_int_digits} digits")
        return sp.Integer(value)

    def _int_or_double(self, value: Value) -> Value:
        return self._int(int(value)) if isinstance(value, sp.Integer) else _double(value)

    def _numeric(self, op: ast.operator, a: Value, b: Value) -> Value:
        both_int = isinstance(a, sp.Integer) and isinstance(b, sp.Integer)
        if isinstance(op, ast.Pow):
            return self._power(a, b)
        if isinstance(op, (ast.Add, ast.Sub, ast.Mult)):
            if both_int:
                return self._int(int(_ARITH[type(op)](a, b)))
            return _double(_ARITH[type(op)](_double(a), _double(b)))
        if b.is_zero:  # .is_zero, not == 0: sympy's Float(0.0) == 0 is False
            raise MathInputError("division by zero")
        if isinstance(op, ast.Div):
            return _double(sp.Rational(a, b) if both_int else _double(a) / _double(b))
        # // and % on the exact values of the operands (exact for ints, the doubles' binary values else).
        ra, rb = (a, b) if both_int else (sp.Rational(float(a)), sp.Rational(float(b)))
        quotient = sp.floor(ra / rb)
        result = quotient if isinstance(op, ast.FloorDiv) else ra - rb * quotient
        return self._int(int(result)) if both_int else _double(result)

    def _power(self, a: Value, b: Value) -> Value:
        if isinstance(a, sp.Integer) and isinstance(b, sp.Integer) and b >= 0:
            if abs(a) > 1 and int(b) * abs(int(a)).bit_length() > self.max_bits + 64:
                raise MathInputError(f"result would have more than {self.limits.max_int_digits} digits")
            return self._int(int(a) ** int(b))
        base, exponent = _double(a), _double(b)
        if base.is_zero and exponent < 0:
            raise MathInputError("zero cannot be raised to a negative power")
        if base < 0 and not float(exponent).is_integer():
            raise MathInputError("a negative number to a fractional power is not a real number")
        return _double(base**exponent)

    def _symbolic(self, op: ast.operator, a: Value, b: Value) -> Value:
        if isinstance(op, ast.Pow):
            if _is_num(b) and abs(b) > self.limits.max_degree:
                raise MathInputError(f"powers of variables above {self.limits.max_degree} are not supported")
            return a**b
        if isinstance(op, (ast.Div, ast.FloorDiv, ast.Mod)) and _is_num(b) and b.is_zero:
            raise MathInputError("division by zero")
        if isinstance(op, ast.FloorDiv):
            return sp.floor(a / b)
        if isinstance(op, ast.Mod):
            return sp.Mod(a, b)
        if isinstance(op, ast.Div):
            return a / b
        return _ARITH[type(op)](a, b)


_ARITH: dict[type, Callable[[Value, Value], Value]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
}


def _unary(function: Callable[[Value], Value]) -> Callable[[Evaluator, Value], Value]:
    """A math-module function of one double: ``sin(30)`` evaluates sympy's sin at the double 30.0."""
    return lambda _ev, x: _real(function(_double(x)))


def _log(_ev: Evaluator, x: Value, base: Value | None = None) -> Value:
    value = _real(sp.log(_double(x)))
    if base is None:
        return value
    divisor = _real(sp.log(_double(base)))
    if divisor.is_zero:
        raise MathInputError("division by zero")
    return _double(value / divisor)


def _log_base(base: int) -> Callable[[Evaluator, Value], Value]:
    def log_base(_ev: Evaluator, x: Value) -> Value:
        if x <= 0:
            raise MathInputError("math domain error")
        # Evaluated with guard digits and rounded once, so that log10(1000) is exactly 3.0 as in Python.
        return _double((sp.log(sp.Rational(float(x))) / sp.log(base)).evalf(30))

    return log_base


def _sqrt(_ev: Evaluator, x: Value) -> Value:
    if x < 0:
        raise MathInputError("math domain error")
    return _real(sp.sqrt(_double(x)))


def _factorial(ev: Evaluator, n: Value) -> Value:
    if not isinstance(n, sp.Integer) or n < 0:
        raise MathInputError("factorial() needs a non-negative integer")
    if n > ev.limits.max_factorial:
        raise MathInputError(f"factorial() is limited to n <= {ev.limits.max_factorial}")
    return sp.factorial(n)


def _round(ev: Evaluator, x: Value, digits: Value | None = None) -> Value:
    if digits is not None and not isinstance(digits, sp.Integer):
        raise MathInputError("round() needs an integer number of digits")
    if isinstance(x, sp.Integer) and (digits is None or digits >= 0):
        return x
    places = 0 if digits is None else max(-400, min(400, int(digits)))
    exact = sp.Rational(int(x)) if isinstance(x, sp.Integer) else sp.Rational(float(x))
    scaled = exact * sp.Integer(10) ** places
    nearest = sp.floor(scaled + sp.Rational(1, 2))
    if nearest - scaled == sp.Rational(1, 2) and nearest % 2:  # a tie goes to the even neighbour
        nearest -= 1
    result = nearest / sp.Integer(10) ** places
    if digits is None:
        return sp.Integer(result)
    return sp.Integer(result) if isinstance(x, sp.Integer) else _double(result)


def _pow(ev: Evaluator, a: Value, b: Value, mod: Value | None = None) -> Value:
    if mod is None:
        return ev._power(a, b)  # as a ** b
    if not all(isinstance(v, sp.Integer) for v in (a, b, mod)) or b < 0 or mod == 0:
        raise MathInputError("pow() with a modulus needs integers, a non-negative exponent and a non-zero modulus")
    return sp.Integer(pow(int(a), int(b), int(mod)))


def _extreme(pick_max: bool) -> Callable[..., Value]:
    def pick(_ev: Evaluator, *values: Value) -> Value:
        best = values[0]
        for value in values[1:]:
            if (value > best) if pick_max else (value < best):
                best = value
        return best

    return pick


_NUMERIC: dict[str, Callable[..., Value]] = {
    "sqrt": _sqrt,
    "exp": _unary(sp.exp),
    "log": _log,
    "ln": _log,
    "log10": _log_base(10),
    "log2": _log_base(2),
    "sin": _unary(sp.sin),
    "cos": _unary(sp.cos),
    "tan": _unary(sp.tan),
    "asin": _unary(sp.asin),
    "acos": _unary(sp.acos),
    "atan": _unary(sp.atan),
    "arcsin": _unary(sp.asin),
    "arccos": _unary(sp.acos),
    "arctan": _unary(sp.atan),
    "atan2": lambda _ev, y, x: _real(sp.atan2(_double(y), _double(x))),
    "sinh": _unary(sp.sinh),
    "cosh": _unary(sp.cosh),
    "tanh": _unary(sp.tanh),
    "degrees": lambda _ev, x: _double(_double(x) * _double(180.0 / math.pi)),
    "radians": lambda _ev, x: _double(_double(x) * _double(math.pi / 180.0)),
    "abs": lambda _ev, x: abs(x),
    "floor": lambda _ev, x: sp.floor(x),
    "ceil": lambda _ev, x: sp.ceiling(x),
    "factorial": _factorial,
    "round": _round,
    "pow": _pow,
    "min": _extreme(False),
    "max": _extreme(True),
}
"""Each function applied to numbers, with the result type of Python's math module and builtins."""

_SYMBOLIC: dict[str, Callable[..., Value]] = {
    "sqrt": sp.sqrt,
    "exp": sp.exp,
    "log": sp.log,
    "ln": sp.log,
    "log10": lambda x: sp.log(x, 10),
    "log2": lambda x: sp.log(x, 2),
    "sin": sp.sin,
    "cos": sp.cos,
    "tan": sp.tan,
    "asin": sp.asin,
    "acos": sp.acos,
    "atan": sp.atan,
    "arcsin": sp.asin,
    "arccos": sp.acos,
    "arctan": sp.atan,
    "atan2": sp.atan2,
    "sinh": sp.sinh,
    "cosh": sp.cosh,
    "tanh": sp.tanh,
    "abs": sp.Abs,
    "floor": sp.floor,
    "ceil": sp.ceiling,
    "min": sp.Min,
    "max": sp.Max,
}
"""Functions that may take a variable in the solver."""


def calculate_text(expression: str, limits: MathLimits) -> str:
    """Evaluate a calculator expression and print it as the recorded calculator did.

    Returns:
        ``str(int)`` for an integer result, ``repr(float)`` for a float (``'36'``, ``'10.0'``).

    Raises:
        MathInputError: If the expression cannot be computed.
    """
    names: dict[str, Value] = {}
    evaluate = Evaluator(limits, CALC_CONSTANTS, names)
    value: Value = None
    for statement in parse_calculation(expression, limits):
        value = evaluate(statement.expression)
        if statement.target:
            names[statement.target] = value
    if isinstance(value, sp.Integer):
        return str(int(value))
    return repr(float(value))


def solve_rows(equation: str, limits: MathLimits) -> list[dict[str, str]]:
    """Solve ``;``-separated equations with sympy; print each value as the recorded solver did.

    Returns:
        One ``{name: value}`` dict per solution, in sympy's order. Exact values print exactly (``17/3``,
        ``sqrt(15)``); values computed from floats print with 15 significant digits (``86.0869565217391``).

    Raises:
        MathInputError: No solution, infinitely many, or input that cannot be solved.
    """
    equations, bare = parse_equations(equation, limits)
    evaluate = Evaluator(limits, SOLVER_CONSTANTS, {})
    exprs = [evaluate(left) - evaluate(right) for left, right in equations]
    targets = [evaluate(node) for node in bare]
    if not exprs:  # only expressions: each one means "expression = 0"
        exprs, targets = targets, []
    symbols: set[sp.Symbol] = set().union(*(expr.free_symbols for expr in exprs))
    if not symbols:
        raise MathInputError("no variable to solve for")
    wanted = set().union(*(target.free_symbols for target in targets)) & symbols
    unknowns = sorted(wanted or symbols, key=str)
    if len(unknowns) > limits.max_unknowns:
        raise MathInputError(f"more than {limits.max_unknowns} unknowns")
    if max(_degree(expr) for expr in exprs) > limits.max_degree:
        raise MathInputError(f"polynomials of degree above {limits.max_degree} are not supported")
    try:
        # One equation goes in bare: sympy returns [] for [x**5 - x - 1] but the CRootOf roots for x**5 - x - 1.
        solutions = sp.solve(exprs[0] if len(exprs) == 1 else exprs, unknowns, dict=True)
    except (NotImplementedError, ValueError, TypeError, AttributeError, ZeroDivisionError) as err:
        raise MathInputError(f"sympy cannot solve this: {type(err).__name__}") from None
    rows = [{str(name): _value_text(value) for name, value in row.items()} for row in solutions]
    rows = [row for row in rows if row]
    if not rows:
        raise MathInputError("sympy found no solution")
    if len(rows) > limits.max_solutions:
        raise MathInputError(f"more than {limits.max_solutions} solutions")
    return rows


def _degree(expr: Value) -> int:
    """An upper bound of the total degree, read off the tree without expanding it."""
    if isinstance(expr, sp.Symbol):
        return 1
    if isinstance(expr, sp.Pow) and _is_num(expr.exp):
        return _degree(expr.base) * math.ceil(abs(expr.exp))
    if isinstance(expr, sp.Mul):
        return sum(_degree(arg) for arg in expr.args)
    return max((_degree(arg) for arg in expr.args), default=0)


def _value_text(value: Value) -> str:
    if value.free_symbols:
        raise MathInputError("infinitely many solutions: give as many equations as unknowns")
    if value.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
        raise MathInputError("no finite solution")
    text = str(value)
    if value.has(sp.CRootOf) or len(text) > 200:  # unreadable closed forms print as 15-digit numbers
        text = str(value.evalf(15))
    return text


def handle(op: str, arg: str, options: dict[str, Any] | None = None) -> Any:
    """The worker's entry point: run one job and return JSON-ready data.

    Args:
        op: ``"calculate"`` or ``"solve"``.
        arg: The model's text.
        options: :meth:`MathLimits.as_dict` of the caller's limits.

    Raises:
        MathInputError: The job cannot be computed (the message is for the model).
        ValueError: Unknown ``op``.
    """
    limits = limits_from(options)
    if op == "calculate":
        return calculate_text(arg, limits)
    if op == "solve":
        return solve_rows(arg, limits)
    raise ValueError(f"unknown math job {op!r}")


def warm_up() -> None:
    """Run one small job of each kind so that sympy's lazily loaded parts are loaded before the first call."""
    handle("calculate", "sqrt(2)*2/3")
    handle("solve", "2x+y=3;x-y=0")
    handle("solve", "x^2=2")
