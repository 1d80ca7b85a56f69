"""Build the native modules in ext/ into the gateway package.

Each ext/NAME.pyx becomes gateway.NAME; its pure-Python twin lives in
gateway/ and is chosen instead when the extension is missing or
FAIRGATE_NO_EXTENSIONS=1 is set.
"""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

# _records_c hashes with OpenSSL's SHA256() directly (the library hashlib uses).
LIBRARIES = {"_records_c": ["crypto"]}

extensions = [
    Extension(
        f"gateway.{pyx.stem}",
        [str(pyx)],
        extra_compile_args=["-O2", "-ffp-contract=off", "-Wno-deprecated-declarations"],
        libraries=LIBRARIES.get(pyx.stem, []),
    )
    for pyx in sorted(Path("ext").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level="3",
        compiler_directives={"boundscheck": False, "wraparound": False},
    )
)
