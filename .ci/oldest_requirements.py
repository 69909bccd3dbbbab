"""Prints the oldest releases the package claims, one `name==version` per line: the lower bound of each requirement
of the package and of its `train` extra in setup.cfg (`pip install -r <(python .ci/oldest_requirements.py)`)."""

import configparser
import re
from pathlib import Path

SETUP_CFG = Path(__file__).parents[1] / "setup.cfg"


def lower_bounds() -> list[str]:
    config = configparser.ConfigParser()
    config.read(SETUP_CFG)
    lines = config["options"]["install_requires"].splitlines()
    lines += config["options.extras_require"]["train"].splitlines()
    pins = []
    for line in lines:
        match = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", line.strip())
        if match:
            pins.append(f"{match[1]}=={match[2]}")
    return pins


if __name__ == "__main__":
    print("\n".join(lower_bounds()))
