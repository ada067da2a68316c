"""The README's runnable example of the vectorised primitives keeps working."""

import re
import subprocess
import sys
from pathlib import Path


def test_primitives_example_runs():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "fl.jit_round" in b)
    proc = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    losses = [float(line.split()[1]) for line in proc.stdout.splitlines()]
    assert len(losses) == 3 and all(8 < x < 10 for x in losses)  # about log(8192) = 9.01 at init
