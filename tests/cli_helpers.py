"""Running the `fastvae` command line in a subprocess, as a user runs it (shared by the CLI tests)."""

import subprocess
import sys


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastvae", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def run_in_process(*args):
    """`fastvae ARGS` as main() in this process (fast: no interpreter start-up): (exit status, stdout,
    stderr); argparse's exits count as the status they carry. Bugs propagate as their exception."""
    import contextlib
    import io

    from fastvae.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def error_line(result, command, *needles):
    """Assert that result, run_in_process's (status, stdout, stderr), is a refusal: non-zero status, no
    traceback, and stderr's last line is the command's one-line error holding every needle."""
    code, _, err = result
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"fastvae {command}: error: "), err
    assert all(n in last for n in needles), err
    return last
