"""Arms the test faults (`faults.py`) in every Python process started with this folder on PYTHONPATH:
the fault tests' driver and the Ray workers its local cluster starts."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import faults  # noqa: E402

faults.arm()
