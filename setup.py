"""Optional compiled build of the request path with mypyc; pure Python unless asked for.

    BALANCERPOOL_MYPYC=1 pip wheel --no-build-isolation --no-deps -w dist .

pyproject.toml holds everything else. The modules are named through `typings/balancerpool/`, whose
`proxy` link gives mypyc the package path `balancerpool.proxy` the wheel installs them under.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup

#: The request path: what every proxied request runs through (docs/performance.md). The rest
#: (server, workers, cli, admin, the operator) stays interpreted: it runs once per connection or
#: per change, and the async generators in agen.py cannot be compiled.
COMPILED = (
    "headers",
    "frontend",
    "forward",
    "upstream",
    "messages",
    "scheduling",
    "model",
    "hardening",
    "health",
    "accesslog",
    "sticky",
    "hashing",
    "keys",
    "metrics",
)


def ext_modules() -> list[Extension]:
    if os.environ.get("BALANCERPOOL_MYPYC", "") in ("", "0"):
        return []
    from mypyc.build import mypycify

    return list(
        mypycify(
            [f"typings/balancerpool/proxy/{name}.py" for name in COMPILED],
            opt_level="3",
            multi_file=True,
        )
    )


if __name__ == "__main__":  # as setuptools runs it; `from setup import COMPILED` only reads the list
    setup(ext_modules=ext_modules())
