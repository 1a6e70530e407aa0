"""Text checks, an AST allowlist and the limits shared by the calculator and the equation solver.

Model-written math never reaches ``eval``, ``exec``, ``sympify`` or ``parse_expr`` (they run Python code).
Text is parsed by :func:`ast.parse`, which only builds a tree, and every node of that tree is checked against
a short allowlist: numbers, ``+ - * / // % **`` (``^`` is power, as the model writes it), unary signs,
parentheses, calls of listed functions and listed constants or, in the solver, plain variable names. The
checked tree is then evaluated by :mod:`moss_agent.tools.math.evaluate` in a worker process, never in the agent.

This module imports only the standard library, so the agent can check input without importing sympy.
"""

from __future__ import annotations

import ast
import itertools
import re
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "CALC_CONSTANTS",
    "FUNCTIONS",
    "SOLVER_CONSTANTS",
    "MathInputError",
    "MathLimits",
    "Statement",
    "check_tree",
    "describe",
    "limits_from",
    "parse_calculation",
    "parse_equations",
    "prepare_text",
]


@dataclass(frozen=True)
class MathLimits:
    """Caps that keep every computation small; input beyond them gets ``No result.``.

    Attributes:
        max_length: Characters of input.
        max_depth: Nesting depth of the expression tree.
        max_nodes: Nodes of the expression tree.
        max_int_digits: Decimal digits of any integer, input or intermediate.
        max_factorial: Largest ``n`` of ``factorial(n)``.
        max_degree: Largest degree of a polynomial in the solver.
        max_parts: ``;``-separated statements or equations.
        max_unknowns: Variables the solver solves for at once.
        max_solutions: Solutions the solver prints.
    """

    max_length: int = 1000
    max_depth: int = 40
    max_nodes: int = 400
    max_int_digits: int = 4000
    max_factorial: int = 1000
    max_degree: int = 16
    max_parts: int = 16
    max_unknowns: int = 8
    max_solutions: int = 16

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MathLimits.{name} must be a positive integer, got {value!r}")
        if self.max_int_digits > 4300:  # Python refuses to print longer integers by default
            raise ValueError("MathLimits.max_int_digits must be at most 4300")

    @property
    def max_int_bits(self) -> int:
        """Bits of the largest integer allowed (``max_int_digits`` decimal digits)."""
        return int(self.max_int_digits * 3.33) + 1

    def as_dict(self) -> dict[str, int]:
        """The limits as plain JSON-ready data (sent to the worker process)."""
        return asdict(self)


class MathInputError(ValueError):
    """The model's input cannot be computed; the message says why, for the model to read."""


_ONE_ARGUMENT = (
    "sqrt exp ln log10 log2 sin cos tan asin acos atan arcsin arccos arctan sinh cosh tanh degrees radians abs floor "
    "ceil factorial"
)
FUNCTIONS: dict[str, tuple[int, int]] = {
    **dict.fromkeys(_ONE_ARGUMENT.split(), (1, 1)),
    "log": (1, 2),
    "pow": (2, 3),  # the builtin: pow(12, 1/3) as MOSS writes it; pow(a, b, m) on integers
    "round": (1, 2),
    "atan2": (2, 2),
    "min": (2, 8),
    "max": (2, 8),
}
"""Callable names and their (least, most) number of arguments."""

CALC_CONSTANTS = frozenset({"pi", "e", "tau"})
"""Constant names of the calculator (Python's ``math`` values)."""

SOLVER_CONSTANTS = frozenset({"pi"})
"""Constant names of the solver; ``e`` and ``tau`` are ordinary variables there (``a+b+c+d+e=45``)."""

# Letters and digits only, no leading underscore: rules out dunders and private names outright.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_UNARY = (ast.UAdd, ast.USub)


def prepare_text(text: object, limits: MathLimits) -> str:
    """Normalise model-written math text before parsing.

    Rejects anything outside ASCII: fullwidth digits and Cyrillic look-alikes (Python's parser would fold
    some of them into real names) and words such as units (the recorded calculator silently dropped Chinese
    characters, so that ``147227.31亿美元*6.474`` gave a wrong value). Writes ``^`` as ``**``.

    Raises:
        MathInputError: Empty, too long, or not plain ASCII math.
    """
    if not isinstance(text, str):
        raise MathInputError(f"expected text, got {type(text).__name__}")
    if len(text) > limits.max_length:
        raise MathInputError(f"input longer than {limits.max_length} characters")
    text = text.strip()
    if not text:
        raise MathInputError("empty input")
    if not text.isascii():
        bad = next(ch for ch in text if not ch.isascii())
        raise MathInputError(f"unsupported character {bad!r} (U+{ord(bad):04X}); write plain ASCII math")
    if _CONTROL.search(text):
        raise MathInputError("control characters are not allowed")
    return text.replace("^", "**")


def _parse(source: str, mode: str) -> ast.AST:
    try:
        return ast.parse(source, mode=mode)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise MathInputError(f"cannot parse {source[:60]!r}: {type(err).__name__}") from None


class _Checker:
    """Walks a tree once, rejecting every node outside the allowlist and beyond the caps.

    Integer-only subtrees are computed exactly on the way (plain Python ints, each step capped before it
    runs), so that ``9^9^9``, ``10**10**10`` or ``factorial(10**8)`` are refused here, in microseconds,
    without the worker. Each visit returns ``(value, has_variable)``; ``value`` is None unless the subtree is
    an integer known here.
    """

    def __init__(
        self, limits: MathLimits, constants: frozenset[str], variables: bool, known: dict[str, int | None]
    ) -> None:
        self.limits = limits
        self.constants = constants
        self.variables = variables
        self.known = known
        self.nodes = 0
        self.names: set[str] = set()

    def visit(self, node: ast.AST, depth: int) -> tuple[int | None, bool]:
        self.nodes += 1
        if self.nodes > self.limits.max_nodes:
            raise MathInputError(f"expression larger than {self.limits.max_nodes} parts")
        if depth > self.limits.max_depth:
            raise MathInputError(f"expression nested deeper than {self.limits.max_depth} levels")
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MathInputError(f"only numbers are allowed, not {value!r}"[:120])
            return (self._int(value) if isinstance(value, int) else None), False
        if isinstance(node, ast.Name):
            return self._name(node.id)
        if isinstance(node, ast.BinOp) and isinstance(node.op, _BINOPS):
            (left, left_var), (right, right_var) = self.visit(node.left, depth + 1), self.visit(node.right, depth + 1)
            if isinstance(node.op, ast.Pow) and left_var and right is not None and abs(right) > self.limits.max_degree:
                raise MathInputError(f"powers of variables above {self.limits.max_degree} are not supported")
            if left is None or right is None:
                return None, left_var or right_var
            return self._int_op(node.op, left, right), False
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, _UNARY):
            value, has_var = self.visit(node.operand, depth + 1)
            return (-value if value is not None and isinstance(node.op, ast.USub) else value), has_var
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        raise MathInputError(f"unsupported syntax: {type(node).__name__}")

    def _int(self, value: int) -> int:
        if value.bit_length() > self.limits.max_int_bits:
            raise MathInputError(f"integer with more than {self.limits.max_int_digits} digits")
        return value

    def _int_op(self, op: ast.operator, a: int, b: int) -> int | None:
        if isinstance(op, ast.Div):
            return None  # a float: left to the worker
        if isinstance(op, (ast.FloorDiv, ast.Mod)):
            if b == 0:
                raise MathInputError("division by zero")
            return a // b if isinstance(op, ast.FloorDiv) else a % b
        if isinstance(op, ast.Pow):
            if b < 0:
                return None
            if abs(a) > 1 and b * a.bit_length() > self.limits.max_int_bits + 64:
                raise MathInputError(f"result would have more than {self.limits.max_int_digits} digits")
            return self._int(a**b)
        if isinstance(op, ast.Mult) and a.bit_length() + b.bit_length() > self.limits.max_int_bits + 1:
            raise MathInputError(f"result would have more than {self.limits.max_int_digits} digits")
        return self._int(a * b if isinstance(op, ast.Mult) else a + b if isinstance(op, ast.Add) else a - b)

    def _name(self, name: str) -> tuple[int | None, bool]:
        if name in self.constants:
            return None, False
        if name in self.known:
            return self.known[name], False
        if name in FUNCTIONS:
            raise MathInputError(f"{name} is a function: call it, e.g. {name}(2)")
        if not self.variables or not _NAME.fullmatch(name):
            raise MathInputError(f"unknown name {name!r}")
        self.names.add(name)
        return None, True

    def _call(self, node: ast.Call, depth: int) -> tuple[int | None, bool]:
        func = node.func
        if not isinstance(func, ast.Name) or func.id not in FUNCTIONS:
            shown = func.id if isinstance(func, ast.Name) else type(func).__name__
            raise MathInputError(f"unknown function {shown!r}")
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
            raise MathInputError(f"{func.id}() takes plain arguments only")
        least, most = FUNCTIONS[func.id]
        if not least <= len(node.args) <= most:
            raise MathInputError(f"{func.id}() takes {least} to {most} arguments, got {len(node.args)}")
        args = [self.visit(arg, depth + 1) for arg in node.args]
        value = args[0][0]
        if func.id == "factorial" and value is not None and not 0 <= value <= self.limits.max_factorial:
            raise MathInputError(f"factorial() needs an integer from 0 to {self.limits.max_factorial}")
        return None, any(has_var for _, has_var in args)


def check_tree(
    node: ast.AST,
    limits: MathLimits,
    constants: frozenset[str],
    *,
    variables: bool = False,
    known: dict[str, int | None] | None = None,
) -> tuple[set[str], int | None]:
    """Check one expression tree against the allowlist and the limits.

    Args:
        node: An expression node (``ast.expr``).
        limits: The caps.
        constants: Names that stand for constants.
        variables: Whether other plain names are allowed (as variables).
        known: Names assigned earlier, with their integer value where it is known.

    Returns:
        The variable names the expression uses, and its value if it is an integer computed here.

    Raises:
        MathInputError: On any node outside the allowlist or beyond a cap.
    """
    checker = _Checker(limits, constants, variables, known or {})
    value, _ = checker.visit(node, 0)
    return checker.names, value


@dataclass(frozen=True)
class Statement:
    """One statement of a calculation: ``target = expression``, or the final bare ``expression``."""

    target: str | None
    expression: ast.expr


def parse_calculation(text: object, limits: MathLimits) -> list[Statement]:
    """Parse and check a calculator expression.

    Besides a single expression, the recorded calculator accepted ``;``-separated assignments ending in an
    expression (``p=(3+4+5)/2;sqrt(p*(p-3)*(p-4)*(p-5))``); so does this one.

    Raises:
        MathInputError: If the text is not a checked calculation.
    """
    source = prepare_text(text, limits)
    module = _parse(source, "exec")
    assert isinstance(module, ast.Module)
    body = module.body
    if not body or len(body) > limits.max_parts:
        raise MathInputError("expected one expression, or a few assignments and then an expression")
    statements: list[Statement] = []
    assigned: dict[str, int | None] = {}
    for index, stmt in enumerate(body):
        last = index == len(body) - 1
        if isinstance(stmt, ast.Expr) and last:
            target = None
        elif isinstance(stmt, ast.Assign) and not last and len(stmt.targets) == 1:
            name = stmt.targets[0]
            if not isinstance(name, ast.Name) or not _NAME.fullmatch(name.id):
                raise MathInputError("only simple names can be assigned")
            if name.id in FUNCTIONS or name.id in CALC_CONSTANTS:
                raise MathInputError(f"{name.id} is built in and cannot be assigned")
            target = name.id
        else:
            raise MathInputError("expected one expression, or a few assignments and then an expression")
        unknown, value = check_tree(stmt.value, limits, CALC_CONSTANTS, variables=True, known=assigned)
        if unknown:
            raise MathInputError(f"unknown name {sorted(unknown)[0]!r}: the calculator needs numbers")
        if target:
            assigned[target] = value
        statements.append(Statement(target, stmt.value))
    return statements


_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>\*\*|//|==|[-+*/%(),;=]))"
)


def _tokens(source: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    source = source.rstrip()
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if not match:
            raise MathInputError(f"unexpected character {source[pos:].strip()[:1]!r}")
        kind = match.lastgroup or "op"
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


def _implicit_products(tokens: list[tuple[str, str]], constants: frozenset[str]) -> list[str]:
    """Token texts with ``*`` written out: ``2x`` -> ``2*x``, ``)(`` -> ``)*(``, ``xy`` -> ``x*y``.

    A name of several letters is read as a product only when each of its letters is also used as a variable
    on its own in the same input (``x+y=7;xy=12``), so ``rate`` or ``mu`` stay names.
    """
    singles = {text for kind, text in tokens if kind == "name" and len(text) == 1}
    words: list[tuple[str, str]] = []
    for kind, text in tokens:
        splittable = kind == "name" and len(text) > 1 and text.isalpha() and set(text) <= singles
        if splittable and text not in FUNCTIONS and text not in constants:
            words.extend(("name", letter) for letter in text)
        else:
            words.append((kind, text))
    out: list[str] = []
    previous: tuple[str, str] | None = None
    for kind, text in words:
        if previous is not None:
            left_kind, left = previous
            left_ends = left_kind == "num" or left == ")" or (left_kind == "name" and left not in FUNCTIONS)
            right_starts = kind == "name" or text == "(" or (left == ")" and kind == "num")
            if left_ends and right_starts:
                out.append("*")
        out.append(text)
        previous = (kind, text)
    return out


def _split_top(words: list[str], separators: set[str]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    depth = 0
    for word in words:
        if word == "(":
            depth += 1
        elif word == ")":
            depth -= 1
            if depth < 0:
                raise MathInputError("unbalanced parentheses")
        if depth == 0 and word in separators:
            parts.append([])
        else:
            parts[-1].append(word)
    if depth:
        raise MathInputError("unbalanced parentheses")
    return [part for part in parts if part]


def parse_equations(text: object, limits: MathLimits) -> tuple[list[tuple[ast.expr, ast.expr]], list[ast.expr]]:
    """Parse and check solver input: ``;``- or ``,``-separated equations and expressions.

    Multiplication may be implicit (``2x``, ``3(x+1)``, ``(a+b)c``). A part without ``=`` names what to solve
    for when there are equations (``2t+6t+t=1, t``; ``6x^2=2400;x^3``) and means ``expression = 0`` when
    there are none. ``a = b = c`` is two equations; ``==`` reads as ``=``.

    Returns:
        The equations as (left, right) trees and the bare expressions, each checked.

    Raises:
        MathInputError: If the text is not checked solver input.
    """
    source = prepare_text(text, limits)
    words = _implicit_products(_tokens(source), SOLVER_CONSTANTS)
    parts = _split_top(words, {";", ","})
    if not parts:
        raise MathInputError("no equation given")
    if len(parts) > limits.max_parts:
        raise MathInputError(f"more than {limits.max_parts} equations")
    equations: list[tuple[ast.expr, ast.expr]] = []
    bare: list[ast.expr] = []
    for part in parts:
        sides = [_side(side, limits) for side in _split_top(part, {"=", "=="})]
        if len(sides) == 1 and part[0] not in ("=", "==") and part[-1] not in ("=", "=="):
            bare.append(sides[0])
        elif len(sides) >= 2 and len(sides) == sum(w in ("=", "==") for w in part) + 1:
            equations.extend(itertools.pairwise(sides))
        else:
            raise MathInputError("an equation needs an expression on both sides of '='")
    return equations, bare


def _side(words: list[str], limits: MathLimits) -> ast.expr:
    tree = _parse(" ".join(words), "eval")
    assert isinstance(tree, ast.Expression)
    check_tree(tree.body, limits, SOLVER_CONSTANTS, variables=True)
    return tree.body


def describe(err: BaseException) -> str:
    """A one-line error text for the tool artifact."""
    text = str(err) or type(err).__name__
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"  # job errors are ValueErrors


def limits_from(options: dict[str, Any] | None) -> MathLimits:
    """Rebuild limits sent as plain data (the worker side of :meth:`MathLimits.as_dict`)."""
    return MathLimits(**options) if options else MathLimits()
