"""Where the shipped settings files are: the pseudoseg package's folder (the repository root in a checkout,
site-packages/pseudoseg once installed), so every command finds them wherever it is run from."""

from __future__ import annotations

from pathlib import Path

import pseudoseg.tasks as tasks_package

PACKAGE_ROOT = Path(tasks_package.__file__).resolve().parent.parent
SHIPPED_CONFIG = PACKAGE_ROOT / "luigi.cfg"  # every default, read first
DEMO_CONFIG = PACKAGE_ROOT / "demo.cfg"  # `pseudoseg demo`'s settings, read after luigi.cfg and the user's file
