"""Installs the stand-in node kinds in every Python process started with this folder on PYTHONPATH
(the driver tests' subprocesses and Ray jobs)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import standins  # noqa: E402

standins.install()
