"""What `pip install .` asks of an environment: ranges, so a user's own builds (a CUDA torch) stay; the exact
versions the project is tested with live in constraints.txt and fall inside those ranges."""

from __future__ import annotations

import configparser

from packaging.requirements import Requirement

from tests.helpers import REPO


def requirements() -> list[Requirement]:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    lines = [ln.strip() for ln in setup.get("options", "install_requires").splitlines() if ln.strip()]
    return [Requirement(line) for line in lines]


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[name.strip().lower().replace("_", "-")] = version.strip()
    return found


def test_install_requires_are_ranges_and_the_tested_pins_fall_inside_them():
    pinned = pins()
    for req in requirements():
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"{req}: a pin, not a range"
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{req.name} has no tested version in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), f"constraints.txt {name}=={pinned[name]} " \
                                                                       f"is outside {req}"
