"""pseudoseg: tasks layer."""

import os
import sys

# Luigi reads the file LUIGI_CONFIG_PATH names when it is first imported, and a malformed file (a section written
# twice) is then a traceback before any of our code runs. pseudoseg reads that file itself, after the shipped
# luigi.cfg and with one-line errors (tasks.settings.load_config_files), so Luigi is kept from it; the variable
# moves to PSEUDOSEG_USER_CONFIG, which worker processes inherit.
if "luigi" not in sys.modules and "LUIGI_CONFIG_PATH" in os.environ:
    os.environ["PSEUDOSEG_USER_CONFIG"] = os.environ.pop("LUIGI_CONFIG_PATH")
