"""infra: a distributed compute platform for generative modelling of crystal structures."""

from pathlib import Path

from setuptools import find_packages, setup

# One installed namespace: the repository's top-level folders of the cluster side install under ``infra.*``
# (never as generic top-level names such as ``master`` or ``node``); crystallm_core stays a package of its own.
PACKAGE_DIRS = {
    "infra": "infra",  # the user's commands: infra, infra-train, infra-wkdir, the client, the demo
    "infra.spec": "spec",  # the contract: plan schema, stage kinds, workdir setting
    "infra.protos": "protos",  # the wire: messages, stubs, transport
    "infra.master": "master",
    "infra.node": "node",
    "infra.plugins": "plugins",  # built-in plugins (scorers)
}


def _packages() -> list[str]:
    out = []
    for name, folder in PACKAGE_DIRS.items():
        out += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    return out + ["crystallm_core"] + [f"crystallm_core.{sub}" for sub in find_packages("crystallm_core")]


setup(
    name="infra",
    version="0.1.0",
    description="Master, node agents and the crystallm_core library for CIF language models",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir=PACKAGE_DIRS,
    package_data={
        "infra.protos": ["*.proto"],
        "infra.master": [
            "migrations/*.ini",
            "migrations/*.mako",
            "migrations/*.py",
            "migrations/versions/*.py",
            "static/*.js",
            "static/*.css",
        ],
    },
    install_requires=[
        # torch 2.11 (GPU nodes) to 2.13 (CPU wheel in CI) are both exercised.
        "torch>=2.4",
        "numpy>=1.24",
        "pymatgen>=2024.1.1",
        "spglib>=2.1",
        "grpcio>=1.85.1",  # the committed stubs check the runtime version
        "protobuf>=7.35.1,<8",
        "psutil>=5.9",
        "nvidia-ml-py>=12.0",
        "sqlalchemy>=2.0",
        "alembic>=1.12",
        "pyzmq>=25",
        "pydantic>=2.5",
        "rich>=13",
        "pyyaml>=6",
        "matplotlib>=3.7",
        "psycopg2-binary>=2.9",
        "aiohttp>=3.13",  # the master's dashboard and /metrics, on its asyncio loop
        "prometheus-client>=0.20",
        "smact>=4.0,<5",  # the published (CDVAE/DiffCSP) composition-validity rule in `crystallm benchmark csp`
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "ruff>=0.5",
            "grpcio-tools==1.85.1",
            "import-linter>=2.0",
            "cryptography>=42",
            "playwright>=1.40",  # drives the system's Chromium in the dashboard tests (no browser download)
        ],
        # The scorer batches graphs with CHGNet's model internals (BatchedGraph, _compute): the versions
        # its test has been run against.
        "chgnet": ["chgnet>=0.4,<0.5"],
        "oid": ["omegaid>=0.2; python_version>='3.12'"],
    },
    entry_points={
        "console_scripts": [
            "crystallm=crystallm_core.cli:main",
            "infra=infra.cli:main",
            "infra-wkdir=infra.wkdir:main",
            "infra-train=infra.local:main",
        ],
        # Built-in scorers ship as plugins of crystallm_core's group; others' packages add theirs to the same
        # group (docs/PLUGINS.md).
        "crystallm.plugins": [
            "random-scorer=infra.plugins.scorers.random_scorer",
            "chgnet-scorer=infra.plugins.scorers.chgnet_scorer",
            "zmq-scorer=infra.plugins.scorers.zmq_scorer",
        ],
    },
)
