"""Measure the calculator and the equation solver against the results recorded in MOSS's training data.

Every ``Calculate("...") => ...`` and ``Solve("...") =>`` entry in the plugin conversations of
``../shared/moss_data`` is recomputed with ``moss_agent.tools`` and compared with the recorded text. The
agreement rate counts the entries whose recorded result is not a failure (``No result.``); recorded failures
that the tools now answer are counted separately.

Usage:
    python scripts/math_agreement.py [DATA_DIR] [--misses]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from moss_agent.tools.calculator import calculate
from moss_agent.tools.equation_solver import solve

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "moss_data"
FAILURES = {"No result.", "No calculation results.", "None", ""}

_CALC = re.compile(r'^Calculate\("(?P<arg>.*)"\) => (?P<result>.*)$')
_SOLVE = re.compile(r'^Solve\("(?P<arg>.*)"\) =>$')
_COMMAND = re.compile(r"^(Search|Calculate|Solve|Text2Image)\(|^<eor>")


@dataclass
class Case:
    """One recorded command and its result."""

    tool: str
    argument: str
    recorded: str
    source: str
    ours: str = ""

    @property
    def failed(self) -> bool:
        """Whether the recorded result is a failure."""
        return self.recorded in FAILURES


@dataclass
class ToolReport:
    """Agreement of one tool with the recorded results."""

    tool: str
    agree: int = 0
    total: int = 0
    answered_failures: int = 0
    recorded_failures: int = 0
    misses: list[tuple[str, Case]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Agreeing share of the recorded results that are not failures."""
        return self.agree / self.total if self.total else 0.0


def recorded_cases(data_dir: Path) -> list[Case]:
    """Every Calculate and Solve entry of the plugin conversations, in file order."""
    cases: list[Case] = []
    for path in sorted((data_dir / "conversations" / "conversation_with_plugins").rglob("*.json")):
        chat = json.loads(path.read_text(encoding="utf-8"))["chat"]
        for turn in chat.values():
            lines = turn.get("Tool Responses", "").split("\n")
            for i, line in enumerate(lines):
                if match := _CALC.match(line):
                    result = match["result"].strip()
                    if result.startswith("'"):
                        result = ast.literal_eval(result)  # a quoted repr; literal_eval runs no code
                    cases.append(Case("Calculate", match["arg"], result, path.name))
                elif match := _SOLVE.match(line):
                    body = []
                    for follow in lines[i + 1 :]:
                        if not follow or _COMMAND.match(follow):
                            break
                        body.append(follow)
                    cases.append(Case("Solve", match["arg"], "\n".join(body), path.name))
    return cases


def _number(text: str) -> complex | None:
    try:
        return complex(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        return None


def _category(case: Case) -> str:
    if case.ours in FAILURES:
        return "we give No result"
    if case.tool == "Calculate":
        ours, theirs = _number(case.ours), _number(case.recorded)
        if ours is not None and theirs is not None and abs(ours - theirs) <= 1e-9 * max(1.0, abs(theirs)):
            return "same number, printed differently"
        return "different value"
    ours_lines, their_lines = case.ours.split("\n"), case.recorded.split("\n")
    if [line.split(" = ")[0] for line in ours_lines] != [line.split(" = ")[0] for line in their_lines]:
        return "different variables or number of solutions"
    pairs = [
        (_number(a.split(" = ")[-1]), _number(b.split(" = ")[-1])) for a, b in zip(ours_lines, their_lines, strict=True)
    ]
    if all(a is not None and b is not None and abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in pairs):
        return "same values, printed differently (exact vs float)"
    return "different values"


def measure(data_dir: Path = DEFAULT_DATA, *, timeout: float = 10.0) -> dict[str, ToolReport]:
    """Recompute every recorded Calculate and Solve; return one report per tool.

    Args:
        data_dir: The MOSS data folder.
        timeout: Seconds each computation may run (generous by default: this measures answers, not speed).
    """
    reports = {"Calculate": ToolReport("Calculate"), "Solve": ToolReport("Solve")}
    for case in recorded_cases(data_dir):
        if case.tool == "Calculate":
            case.ours = calculate(case.argument, timeout=timeout) or "No result."
        else:
            lines = solve(case.argument, timeout=timeout)
            case.ours = "\n".join(f"{name} = {value}" for name, value in lines) if lines else "No result."
        report = reports[case.tool]
        if case.failed:
            report.recorded_failures += 1
            report.answered_failures += case.ours not in FAILURES
            continue
        report.total += 1
        if case.ours == case.recorded:
            report.agree += 1
        else:
            report.misses.append((_category(case), case))
    return reports


_CALL = re.compile(r"([A-Za-z_][\w.]*)\s*\(")


def called_functions(cases: list[Case]) -> Counter[str]:
    """How often each function name is called in the recorded Calculate commands (what MOSS writes)."""
    return Counter(name for case in cases if case.tool == "Calculate" for name in _CALL.findall(case.argument))


def main(argv: list[str] | None = None) -> int:
    """Print the agreement of each tool; with ``--misses``, every disagreement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--misses", action="store_true", help="list every disagreement")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per computation (default 10)")
    args = parser.parse_args(argv)
    if not args.data_dir.is_dir():
        parser.error(f"no MOSS data at {args.data_dir}")
    from moss_agent.tools.math.check import FUNCTIONS

    calls = called_functions(recorded_cases(args.data_dir))
    print(
        "Calculate calls: "
        + ", ".join(f"{n} x{c} ({'accepted' if n in FUNCTIONS else 'refused'})" for n, c in calls.most_common())
    )
    for report in measure(args.data_dir, timeout=args.timeout).values():
        print(
            f"{report.tool}: {report.agree}/{report.total} agree ({report.rate:.1%}) over recorded results that "
            f"are not failures; {report.answered_failures} of {report.recorded_failures} recorded failures "
            "now get an answer"
        )
        for category, count in Counter(category for category, _ in report.misses).most_common():
            print(f"  {count} x {category}")
        if args.misses:
            for category, case in report.misses:
                print(
                    f"    [{category}] {case.tool}({case.argument!r})  recorded {case.recorded!r}  ours {case.ours!r}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
