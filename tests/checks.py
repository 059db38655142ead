"""The check-and-count helper of the Python test scripts (tests/<stage>/check_*.py, test_resume.py), which
ctest runs with tests/ on PYTHONPATH (tests/CMakeLists.txt, QLORA_TEST_ENV).

    check = Checks()                 # every check prints `ok` or `FAIL` and its expectation
    check = Checks(passes=False)     # only failures print (descriptions say what went wrong)
    check(cond, what)                # records `what` when cond is false; returns cond
    sys.exit(check.report())         # prints the outcome; 0 when every check passed, else 1
"""
import sys


class Checks:
    def __init__(self, passes=True):
        self.passes = passes
        self.failures = []

    def __call__(self, cond, what):
        if self.passes:
            print(("ok   " if cond else "FAIL ") + what, flush=True)
        elif not cond:
            print("FAIL:", what, file=sys.stderr, flush=True)
        if not cond:
            self.failures.append(what)
        return cond

    def report(self):
        if self.failures:
            print(f"{len(self.failures)} failure(s):", *self.failures, sep="\n  ", file=sys.stderr)
            return 1
        print("OK")
        return 0
