"""The seed's server, ``dora-openai-server`` 0.5.0 from PyPI, unchanged but for where it listens.

It hard-codes ``0.0.0.0:8000``; the benchmark binds to 127.0.0.1 and a free
port (``OPENAI_STREAM_SERVER_PORT``, set by ``tests.dataflow.Dataflow``).
Importing its module creates its ``Node()``, as it does when run directly.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import uvicorn


def main() -> None:
    from dora_openai_server import main as seed  # creates the seed's Node() at import, as the seed does

    port = int(os.environ.get("OPENAI_STREAM_SERVER_PORT", "8000"))

    def config(app: Any, **kwargs: Any) -> uvicorn.Config:
        kwargs.update(host="127.0.0.1", port=port)
        return uvicorn.Config(app, **kwargs)

    seed.uvicorn = SimpleNamespace(Config=config, Server=uvicorn.Server)
    seed.main()


if __name__ == "__main__":
    main()
