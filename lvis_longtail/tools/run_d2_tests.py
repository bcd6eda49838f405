"""Run detectron2's own unit tests against this install, with lvis_longtail's compat layer.

    python -m lvis_longtail.tools.run_d2_tests PATH/TO/detectron2/tests [pytest args ...]

PATH is upstream's ``tests/`` folder of the installed version (for 0.6: ``git show v0.6:tests``
of facebookresearch/detectron2; the PyPI sdist does not ship it). ``import lvis_longtail`` is
loaded as a pytest plugin, so the compat shims are in place before any test module imports
detectron2, as they are in this project. Nothing is downloaded: tests that need the network
or files absent here fail or skip, as they would upstream. The summary and the causes of the
remaining failures are recorded in ``docs/environment.md``. Not part of ``make test``.
"""

import os
import subprocess
import sys
from typing import List, Optional


def pytest_command(tests_dir: str, extra: List[str]) -> List[str]:
    """The pytest command line: lvis_longtail as an early plugin, upstream's folder as the
    root (its own package layout), none of this repository's pytest settings."""
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "lvis_longtail",
        "-p",
        "no:cacheprovider",
        "-c",
        os.devnull,
        "--rootdir",
        os.path.dirname(os.path.abspath(tests_dir)),
        "-q",
        "-rfE",
        os.path.abspath(tests_dir),
        *extra,
    ]


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    tests_dir, extra = argv[0], argv[1:]
    if not os.path.isfile(os.path.join(tests_dir, "test_registry.py")):
        print(f"{tests_dir}: not detectron2's tests/ folder (no test_registry.py)", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    # upstream's tests import each other as the package `tests`
    root = os.path.dirname(os.path.abspath(tests_dir))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.call(pytest_command(tests_dir, extra), env=env, cwd=root)


if __name__ == "__main__":
    sys.exit(main())
