"""The demo refuses a bad argument in one line, rc 2, before it loads the model."""

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tokens", "0"], "argument --tokens: 0 is not valid; give an integer >= 512"),
        (["--data-dir", "/nonexistent/lp_fx-data"], "data directory /nonexistent/lp_fx-data does not exist"),
        (["--start", "3", "--end", "4"], "end - start = 1 is odd"),
        (["--rounds", "0"], "argument --rounds: 0 is not valid; give an integer >= 1"),
        (["--checkpoint", "/nonexistent/ckpt"], "--checkpoint /nonexistent/ckpt: no such directory"),
        (["--model", "llama"], "argument --model: invalid choice: 'llama' (choose from 'smollm2', 'gemma3')"),
    ],
)
def test_the_demo_refuses_a_bad_argument_in_one_line(argv, message):
    done = subprocess.run([sys.executable, str(DEMO), *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
