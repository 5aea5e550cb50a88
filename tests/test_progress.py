"""Progress output: one line per interval, printed once."""

from __future__ import annotations

import os
import subprocess
import sys

from slimmoe.tasks.core.runtime import Progress, progress_line


def test_progress_prints_at_most_one_line_per_interval_and_a_last_one():
    now = [0.0]
    lines: list[str] = []
    p = Progress("pass", total=100, unit="rows", interval_s=10, log=lines.append, clock=lambda: now[0])
    for _ in range(10):  # 10 steps of 3 s: lines at 12 s, 24 s
        now[0] += 3
        p.advance(10)
    p.finish()
    assert len(lines) == 3
    now[0] += 12
    p.advance(0)  # an interval line that says nothing new...
    p.finish()  # ...is not repeated by the closing line
    assert len(lines) == 4 and lines[-1].startswith("[pass] 100/100 rows")
    assert lines[0] == "[pass] 40/100 rows, 3 rows/s, eta 18s"
    assert lines[-1].startswith("[pass] 100/100 rows")


def test_worker_progress_goes_to_stderr_once(capfd):
    """Ray Train workers tee stdout (a print there appeared twice in the driver's log); stderr is echoed once."""
    progress_line("[stage_1] step 10/80")
    out, err = capfd.readouterr()
    assert out == "" and err == "[stage_1] step 10/80\n"


def test_tokenize_without_a_terminal_prints_its_own_line_not_ray_datas_status_blocks(tiny_model_dir, tmp_path):
    from tiny import stdlib_texts

    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(stdlib_texts(max_files=20)):
        (data / f"doc{i:02d}.txt").write_text(text)
    env = dict(os.environ, RAY_ADDRESS="", RAY_AUTH_MODE="disabled")
    done = subprocess.run([sys.executable, "-m", "slimmoe.workflows.cli", "tokenize", str(data / "*.txt"),
                           str(tiny_model_dir), str(tmp_path / "out"), "--seq-len", "32",
                           "--validation-fraction", "0.2"],
                          capture_output=True, text=True, timeout=300, env=env)  # pipes: not a terminal
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "[tokenize] 20 documents" in log
    assert "Running Dataset" not in log and "Total Progress" not in log and "logging_progress" not in log
