"""Build glue for the optional native core (native/, the extension `ipop_trio._native`).

Everything else about the package is declared in pyproject.toml. The extension is built when
cargo is on PATH; without it (or with IPOP_TRIO_PURE_PYTHON=1) the package installs on its
pure-Python path and says so once. A Rust build that fails with cargo present is an error:
a broken toolchain should be seen, not hidden.
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import setup

rust_extensions = []
if os.environ.get("IPOP_TRIO_PURE_PYTHON") == "1":
    why = "IPOP_TRIO_PURE_PYTHON=1"
elif shutil.which("cargo") is None:
    why = "cargo is not on PATH"
else:
    why = ""
    from setuptools_rust import Binding, RustExtension

    rust_extensions.append(
        RustExtension(
            "ipop_trio._native",
            path="native/Cargo.toml",
            binding=Binding.PyO3,
            features=["extension-module"],
            debug=False,
        )
    )
# Once per install: the build step itself, not the metadata steps pip runs before it.
_BUILDS = {"bdist_wheel", "editable_wheel", "build", "build_ext", "develop", "install"}
if why and _BUILDS & set(sys.argv):
    print(
        f"WARNING: ipop-trio: building without its native core ({why}); "
        "the data path runs on pure Python",
        file=sys.stderr,
    )

setup(rust_extensions=rust_extensions, zip_safe=False)
