"""Import shim for Ray jobs submitted with the project as `working_dir` (`slimmoe submit`).

The repository keeps `tasks/` and `workflows/` at its top level and installs them as
`slimmoe.tasks` / `slimmoe.workflows`. In a job whose working_dir is an uploaded copy of the
repository, `slimmoe submit` puts `cluster/pythonpath` on PYTHONPATH, so this package makes
`slimmoe.tasks` and `slimmoe.workflows` resolve to the uploaded copy: the driver and every Ray
worker of the job run the code that was submitted, not whatever version the image installed.
"""

import os

__path__ = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))]
