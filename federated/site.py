"""``python -m federated.site``: one site of a federation in one command (the documented entry point).

The implementation is :mod:`federated.launch.site` (a launcher, like the others); this module only gives it the
short name a site's operator types. ``python -m federated.site --help`` lists the options.
"""

from __future__ import annotations

import sys

from federated.launch.site import main

if __name__ == "__main__":
    sys.exit(main())
