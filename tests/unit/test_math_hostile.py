"""Hostile input for Calculate and Solve: nothing runs code, nothing takes 2 s, every answer is No result or right.

The corpus holds code injection (each payload would create a sentinel file or set an environment variable if it
ever ran), huge numbers, deep nesting, very long input, unicode look-alikes and empty input, for both tools.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from moss_agent.tools.calculator import CalculatorTool, evaluate
from moss_agent.tools.equation_solver import EquationSolverTool, solution_lines, solve_equations
from moss_agent.tools.math.check import MathInputError, MathLimits, parse_calculation, parse_equations

SENTINEL = Path(tempfile.gettempdir()) / f"moss_math_sentinel_{os.getpid()}"
ENV = f"MOSS_MATH_SENTINEL_{os.getpid()}"
LIMIT_S = 2.0

Case = tuple[str, str, object]  # (tool, text, the one right answer besides No result; None: only No result)


def injections(path: str, env: str) -> list[str]:
    touch = f"open('{path}', 'w')"
    return [
        f"__import__('os').system('touch {path}')",
        f'__import__("os").system("touch {path}")',
        f"__import__('os').environ.__setitem__('{env}', '1')",
        f"__import__('os').putenv('{env}', '1')",
        f"__import__('pathlib').Path('{path}').touch()",
        touch,
        f"{touch}.write('x')",
        f'exec("{touch}")',
        f'eval("{touch}")',
        f"compile(\"{touch}\", 's', 'exec')",
        f"getattr(__builtins__, 'open')('{path}', 'w')",
        f"globals()['__builtins__'].open('{path}', 'w')",
        "locals()",
        "vars()",
        "dir()",
        "().__class__.__base__.__subclasses__()",
        "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'catch_warnings'][0]()._module"
        f".__builtins__['__import__']('os').system('touch {path}')",
        "''.__class__.__mro__[1].__subclasses__()",
        "(1).__class__.__bases__[0].__subclasses__()",
        "sqrt.__globals__",
        "pi.__class__",
        "(2).__add__(2)",
        "1 .real",
        "x.__class__.__init__.__globals__",
        f"(lambda: {touch})()",
        f"(lambda p: open(p, 'w'))('{path}')",
        f"[{touch} for _ in [1]]",
        f"{{{touch}}}",
        f"{{1: {touch}}}",
        f"({touch} for _ in [1])",
        f'f"{{{touch}}}"',
        f"(a := {touch})",
        f"1 if {touch} else 2",
        f"{touch} and 1",
        f"not {touch}",
        f"1; import os; os.system('touch {path}')",
        "import os",
        "from os import system",
        f"1\n{touch}",
        f"x = {touch}; 1",
        f"sqrt({touch})",
        f"sqrt(*[{touch}])",
        f"round(ndigits={touch})",
        f"{touch}[0]",
        "breakpoint()",
        "input()",
        "print(1)",
        "help()",
        "exit()",
        "quit()",
        "__builtins__",
        "__import__",
        "__name__",
        "_",
        "__debug__",
        "sympify('1')",
        f'sympify("{touch}")',
        f'parse_expr("{touch}")',
        "S('x')",
        "Symbol('x')",
        "Function('f')(1)",
        "lambdify(x, x)",
        "N(pi)",
        "Integer(2)",
        f"'{path}'",
        "b'1'",
        "...",
        "None",
        "True",
        "1j",
        "2+3j",
        "assert 0",
        "raise SystemExit",
        "del x",
        "yield 1",
        "await x",
        "async def f(): pass",
        "class A: pass",
        "def f(): pass",
        "with x: pass",
        "for i in x: pass",
        "while 1: pass",
        "global x",
        "try:\n pass\nexcept:\n pass",
        "1 < 2",
        "1 << 100000",
        "1 | 2",
        "~1",
        "x[1:2]",
        "{}",
        "[]",
        "()",
        "sqrt(4) + x.real",
        "\\\n__import__('os')",
    ]


def huge_calculations() -> list[Case]:
    cases: list[Case] = [("calc", text, None) for text in [
        "9^9^9", "9**9**9", "10**10**10", "10^10^10", "2^(2^64)", "(10^4000)^2", "10^5000", "99999^99999",
        "factorial(10**8)", "factorial(100000)", "factorial(factorial(20))", "factorial(1001)",
        "n=10**8; factorial(n)", "exp(10^10)", "exp(1e308)", "10.0^400", "1e308*10", "1e309", "9e999*0",
        "1.0000001^1e300", "2^13301", "-(9^9^9)", "9^9^9 - 9^9^9", "0^(9^9^9)",
        "1^(10^10^10)", "sqrt(10^4000)", "log(10^4000)", "a=9^9; b=9^a; b",
    ]]  # fmt: skip
    cases += [
        ("calc", "2^-100000", repr(2.0**-100000)),
        ("calc", "round(1, 10^9)", "1"),
        ("calc", "round(1.5, 10^9)", "1.5"),
        ("calc", "sin(1e308)", repr(math.sin(1e308))),
        ("calc", "tan(10^300)", repr(math.tan(10**300))),
        ("calc", "2^10000 // 2^9999", "2"),
        ("calc", "(2^4000)*(2^4000)", str(2**8000)),  # 2409 digits: within the cap, so computed
    ]
    return cases


def huge_equations() -> list[Case]:
    texts = [
        "x^(9^9^9)=1", "9^9^9*x=1", "x^1000=1", "x^(10^10)=2", "(x+1)^(2^64)=0", "factorial(10**8)*x=1",
        "x=9^9^9", "x^17=1", "((x+1)^16)^16=0", "x^2*x^8*x^8=1", "(a+b+c+d+e+f+g+h)^60=1",
        "x^16+y^16=1;x^15-y=2",
    ]  # fmt: skip
    return [("solve", text, None) for text in texts]


def nesting() -> list[Case]:
    cases: list[Case] = []
    for n in (5, 39, 100, 199, 200, 500):
        cases.append(("calc", "(" * n + "1" + ")" * n, "1"))
        cases.append(("solve", "(" * n + "x" + ")" * n + "=1", [("x", "1")]))
    for n in (30, 41, 900):
        cases.append(("calc", "-" * n + "1", str((-1) ** n)))
        cases.append(("solve", "-" * n + "x=1", [("x", str((-1) ** n))]))
    for n in (5, 50):
        root = 4.0
        for _ in range(n):
            root = math.sqrt(root)
        cases.append(("calc", "sqrt(" * n + "4" + ")" * n, repr(root)))
        cases.append(("calc", "1+(" * n + "1" + ")" * n, str(n + 1)))
    for n in (3, 5, 50):
        cases.append(("calc", "2^" * n + "2", "65536" if n == 3 else None))
        cases.append(("calc", "abs(" * n + "-1" + ")" * n, "1"))
    return cases


def long_inputs() -> list[Case]:
    return [
        ("calc", "1+" * 5000 + "1", None),
        ("calc", "1" * 10_000, None),
        ("calc", " " * 100_000 + "1", None),
        ("calc", "1" + " " * 998, "1"),
        ("calc", "9" * 999, "9" * 999),
        ("calc", "1+" * 499 + "1", "500"),
        ("calc", "a=1;" * 300 + "a", None),
        ("calc", "sqrt(2)*" * 300 + "1", None),
        ("solve", "x+" * 600 + "x=1", None),
        ("solve", "x=1;" * 500, None),
        ("solve", "x" * 5000 + "=1", None),
        ("solve", ",".join(f"x{i}=1" for i in range(30)), None),
    ]


UNICODE = [
    "１+１", "１２３", "ｓｑｒｔ(4)", "ｐｉ*2", "sqrt(\u0430)", "\u0441\u043es(0)", "π*2", "2³", "√4", "½+1", "1＋1",
    "1\u22121", "2×3", "6÷2", "1\u200b+1", "\u202e1+1", "1\u00a0+1", "__\u0131mport__('os')", "ℯ^2", "①+1",
    "٣+1", "३+1", "ﬁ", "𝟏+𝟏", "\ufeff1+1", "1\x00+1", "1\x1b[31m", "一+1", "3万", "147227.31亿美元*6.474",
]  # fmt: skip
UNICODE_EQUATIONS = ["２x=4", "\u0445+1=2", "x²=4", "α+1=2", "ｘ=1", "x\u200b=1", "x=１", "x=\u0661"]
EMPTY = ["", " ", "\n", "\t", ";", ";;", "( )", "=", "\n\n;\n"]


# Payloads that are also math to the solver (implicit products; an expression alone means "= 0"): the one right
# answer besides No result. Nothing runs: `print(1)` is the variable print times 1.
SOLVER_READINGS: dict[str, object] = {
    "print(1)": [("print", "0")],
    "N(pi)": [("N", "0.0")],
    "Integer(2)": [("Integer", "0")],
    "1j": [("j", "0")],
    "2+3j": [("j", "-2/3")],
}


def corpus() -> list[Case]:
    cases: list[Case] = []
    for text in injections(str(SENTINEL), ENV):
        cases += [("calc", text, None), ("solve", text, SOLVER_READINGS.get(text))]
    cases += huge_calculations() + huge_equations() + nesting() + long_inputs()
    cases += [("calc", text, None) for text in UNICODE] + [("solve", text, None) for text in UNICODE]
    cases += [("solve", text, None) for text in UNICODE_EQUATIONS]
    cases += [("calc", text, None) for text in EMPTY] + [("solve", text, None) for text in EMPTY]
    # A second job that runs into the time limit, far from the first: each cut-off job retires its worker process
    # and the hot spare takes over, but two within one worker start-up (about a second) make the next call wait.
    cases.append(("solve", "sin(x)+cos(y)=1;x^2+y=3", None))
    return cases


CORPUS = corpus()


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 200
    assert len({(tool, text) for tool, text, _ in CORPUS}) == len(CORPUS)


@pytest.fixture(scope="module")
def ready_worker() -> None:
    from moss_agent.tools.math.worker import shared_worker

    assert shared_worker().wait_ready()


@pytest.mark.parametrize(("tool", "text", "right"), CORPUS, ids=[f"{i}-{c[0]}" for i, c in enumerate(CORPUS)])
def test_hostile_input(ready_worker: None, tool: str, text: str, right: object) -> None:
    started = time.monotonic()
    if tool == "calc":
        answer: object = evaluate(text)["text"]
    else:
        solutions = solve_equations(text)["solutions"]
        answer = solution_lines(solutions) if solutions else None
    elapsed = time.monotonic() - started
    assert not SENTINEL.exists(), "an injected payload ran"
    assert ENV not in os.environ, "an injected payload ran"
    assert elapsed < LIMIT_S, f"{elapsed:.2f} s"
    assert answer is None or answer == right, answer


def test_hostile_input_through_the_tools() -> None:
    from moss_agent.tools.math.worker import shared_worker

    assert shared_worker().wait_ready()  # the corpus ended with a cut-off job: let the spare become ready
    calculator, solver = CalculatorTool(), EquationSolverTool()
    for tool, text, _ in CORPUS[::7]:
        started = time.monotonic()
        if tool == "calc":
            content = calculator.invoke({"expression": text})
        else:
            content = solver.invoke({"equation": text})
        assert time.monotonic() - started < LIMIT_S
        assert isinstance(content, str)
    assert not SENTINEL.exists() and ENV not in os.environ


def _refused_here(tool: str, text: str) -> bool:
    try:
        (parse_calculation if tool == "calc" else parse_equations)(text, MathLimits())
    except MathInputError:
        return True
    return False


def test_hostile_input_on_a_cold_process_never_waits_for_sympy(tmp_path: Path) -> None:
    """What the agent process refuses (most of the corpus) is answered on a cold start without any worker."""
    refused = [(tool, text) for tool, text, _ in CORPUS if _refused_here(tool, text)]
    assert len(refused) > 0.8 * len(CORPUS)
    (tmp_path / "inputs.json").write_text(json.dumps(refused))
    code = textwrap.dedent(
        """
        import json, sys, time
        from moss_agent.tools.math import worker as _bounded
        from moss_agent.tools.calculator import CalculatorTool
        from moss_agent.tools.equation_solver import EquationSolverTool
        calculator, solver = CalculatorTool(prestart=False), EquationSolverTool(prestart=False)
        slowest = 0.0
        for tool, text in json.load(open(sys.argv[1])):
            started = time.monotonic()
            if tool == "calc":
                assert calculator.invoke({"expression": text}) == "'No result.'", text
            else:
                assert solver.invoke({"equation": text}).strip() == "No result.", text
            slowest = max(slowest, time.monotonic() - started)
        print(json.dumps({"slowest": slowest, "worker": _bounded._SHARED is not None, "sympy": "sympy" in sys.modules}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "inputs.json")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report == {"slowest": report["slowest"], "worker": False, "sympy": False}
    assert report["slowest"] < LIMIT_S


def test_model_text_never_reaches_eval_exec_or_sympy_parsing(tmp_path: Path) -> None:
    """Runs the evaluator in-process with eval, exec, compile and sympy's string parser wrapped.

    sympy itself runs some of them on its own strings when it lazily imports a module (unit prefixes, generated
    helpers); those pass through. A call made from our modules, or one whose text carries the model's input (the
    job text, the sentinel path, the environment variable name), fails the test.
    """
    legit = [("calc", "pi*3^2*20"), ("calc", "p=3;sqrt(p*(p-1))"), ("solve", "x+y=30;y=2x+6"), ("solve", "x^2=2")]
    slow = ("sin(x)+cos(y)", "x^16+y^16")  # minutes of sympy without the worker's time limit
    jobs = [(tool, text) for tool, text, _ in CORPUS if not text.startswith(slow)]
    (tmp_path / "jobs.json").write_text(json.dumps({"jobs": legit + jobs, "markers": [str(SENTINEL), ENV]}))
    code = textwrap.dedent(
        """
        import ast, builtins, json, sys
        from pathlib import Path
        import sympy.parsing.sympy_parser as parser
        from moss_agent.tools.math import evaluate as _math_eval
        ours = str(Path(_math_eval.__file__).resolve().parent)
        spec = json.load(open(sys.argv[1]))
        markers, job, violations = spec["markers"], [""], []
        def wrap(name, function):
            def checked(*args, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                texts = [str(a) for a in args if isinstance(a, (str, bytes))]
                needles = markers + [t for t in (job[0], job[0].replace("^", "**")) if len(t) >= 6]
                if caller.startswith(ours) and name != "compile" or any(n in t for n in needles for t in texts):
                    violations.append([name, caller, job[0][:60]])
                    raise RuntimeError("forbidden: " + name)
                return function(*args, **kwargs)
            return checked
        def parse_only(source, filename, mode, flags=0, *args, **kwargs):
            if not flags & ast.PyCF_ONLY_AST:  # ast.parse compiles to a tree only: that runs nothing
                return checked_compile(source, filename, mode, flags, *args, **kwargs)
            return real_compile(source, filename, mode, flags, *args, **kwargs)
        real_compile = builtins.compile
        checked_compile = wrap("compile", real_compile)
        builtins.eval, builtins.exec = wrap("eval", builtins.eval), wrap("exec", builtins.exec)
        builtins.compile = parse_only
        parser.parse_expr = wrap("parse_expr", parser.parse_expr)
        answers = []
        for tool, text in spec["jobs"]:
            job[0] = text
            try:
                answers.append(_math_eval.handle("calculate" if tool == "calc" else "solve", text))
            except Exception as err:
                answers.append("error: " + type(err).__name__)
        print(json.dumps({"violations": violations, "answers": answers[:4], "count": len(answers)}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "jobs.json")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["violations"] == []
    assert report["count"] == len(legit) + len(jobs)
    assert report["answers"] == [repr(math.pi * 3**2 * 20), repr(math.sqrt(6)), [{"x": "8", "y": "22"}],
                                 [{"x": "-sqrt(2)"}, {"x": "sqrt(2)"}]]  # fmt: skip
    assert not SENTINEL.exists()
