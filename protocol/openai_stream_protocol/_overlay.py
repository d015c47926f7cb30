"""The zenoh overlay check every node runs before ``Node()``.

A daemon started with ``--zenoh-config-overlay <path>`` hands the path to its nodes in
``DORA_ZENOH_CONFIG_OVERLAY``, and dora's ``Node()`` reads it. Under ``dora start`` a node runs in the
daemon's working directory for the dataflow (``_work/<id>/``), where a relative path does not resolve:
``Node()`` then fails, a restart policy starts the node again at once, and it fails again, while nothing
on the HTTP side says why (docs/deploy.md, "Several machines"). Checking first turns that into one
line that says what to do, and an exit status the restart limits of the shipped flows stop on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

ZENOH_OVERLAY_ENV = "DORA_ZENOH_CONFIG_OVERLAY"
OVERLAY_EXIT_STATUS = 2
"""The status a node exits with when the overlay is missing: a bad setting, as for a bad command-line flag."""


def zenoh_overlay_problem(environ: Mapping[str, str], cwd: str | None = None) -> str | None:
    """What is wrong with ``DORA_ZENOH_CONFIG_OVERLAY`` (one line), or ``None`` when it is unset or names a file."""
    value = environ.get(ZENOH_OVERLAY_ENV, "")
    if not value.strip():
        return None
    here = cwd or os.getcwd()
    path = value if os.path.isabs(value) else os.path.join(here, value)
    if os.path.isfile(path):
        return None
    where = "" if os.path.isabs(value) else f" (relative to this node's working directory {here})"
    return (
        f"{ZENOH_OVERLAY_ENV} names the zenoh config overlay {value!r}, which is not a file{where}; "
        'start the daemon with an absolute path, e.g. --zenoh-config-overlay "$PWD/zenoh-lossless.json5" '
        '(docs/deploy.md, "Several machines")'
    )


def check_zenoh_overlay(program: str, environ: Mapping[str, str] | None = None) -> None:
    """Exit with one line on stderr (status ``OVERLAY_EXIT_STATUS``) when the overlay cannot be read; call before ``Node()``."""
    problem = zenoh_overlay_problem(os.environ if environ is None else environ)
    if problem is not None:
        sys.stderr.write(f"{program}: error: {problem}\n")
        sys.stderr.flush()
        raise SystemExit(OVERLAY_EXIT_STATUS)
