"""Every wheel an air-gapped node needs, in one folder; then install there with no index.

    python -m vmaescale.wheelhouse wheels/                         # this machine's platform
    python -m vmaescale.wheelhouse wheels/ --platform manylinux_2_28_x86_64 --python 3.11 --cuda 13
    # copy wheels/ to the cluster, then on a node:
    pip install --no-index --find-links wheels/ vmaescale

Run it from a checkout, on a machine with the package index. It builds the project's wheel and
DeepSpeed's (PyPI has only its source; export DS_BUILD_OPS=1 and friends to prebuild its ops,
which needs the CUDA toolkit there), then fetches torch, DALI for the chosen CUDA and every
dependency as wheels for the target (`pip download --only-binary :all:` for another platform,
`pip wheel` for this one, which also turns source-only dependencies into wheels).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DALI_OF_CUDA = {"13": "nvidia-dali-cuda130==2.4.0", "12": "nvidia-dali-cuda120==2.4.0", "cpu": None}


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def build_local_wheels(out: Path, deepspeed_version: str) -> list[Path]:
    """The project and DeepSpeed as wheels (no dependencies yet), built with this environment's
    setuptools and torch (DeepSpeed's setup.py imports torch)."""
    pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(REPO))
    pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), f"deepspeed=={deepspeed_version}")
    project = sorted(out.glob("vmaescale-*.whl"))[-1]
    deepspeed = sorted(out.glob(f"deepspeed-{deepspeed_version}-*.whl"))[-1]
    return [project, deepspeed]


def requirements(local: list[Path], torch_version: str, cuda: str) -> list[str]:
    dali = DALI_OF_CUDA[cuda]
    return [*map(str, local), f"torch=={torch_version}", *([dali] if dali else [])]


def fetch_dependencies(out: Path, reqs: list[str], platform: str | None, python: str | None) -> None:
    """Every dependency of `reqs` as a wheel in `out`."""
    if platform is None and python is None:
        pip("wheel", "--wheel-dir", str(out), *reqs)
        return
    target = []
    if platform:
        target += ["--platform", platform]
    if python:
        target += ["--python-version", python, "--implementation", "cp"]
    pip("download", "--dest", str(out), "--only-binary", ":all:", *target, *reqs)


def build_wheelhouse(out: Path, platform: str | None = None, python: str | None = None,
                     cuda: str = "13", torch_version: str | None = None,
                     deepspeed_version: str | None = None) -> list[Path]:
    if cuda not in DALI_OF_CUDA:
        raise ValueError(f"--cuda: {cuda!r}; accepted: {sorted(DALI_OF_CUDA)} (cpu = no DALI)")
    out.mkdir(parents=True, exist_ok=True)
    torch_version = torch_version or metadata.version("torch").split("+")[0]
    deepspeed_version = deepspeed_version or metadata.version("deepspeed")
    local = build_local_wheels(out, deepspeed_version)
    fetch_dependencies(out, requirements(local, torch_version, cuda), platform, python)
    return sorted(out.glob("*.whl"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from vmaescale.cli import ArgumentParser, add_debug_flag

    p = ArgumentParser(prog="python -m vmaescale.wheelhouse", description=__doc__)
    p.add_argument("out", type=Path, help="folder for the wheels (created)")
    p.add_argument("--platform", default=None,
                   help="target platform tag, e.g. manylinux_2_28_x86_64 (default: this machine)")
    p.add_argument("--python", default=None, help="target Python, e.g. 3.11 (default: this one)")
    p.add_argument("--cuda", default="13", choices=sorted(DALI_OF_CUDA),
                   help="the nodes' CUDA major version: which DALI wheel (cpu = none)")
    p.add_argument("--torch", default=None, help="torch version (default: the installed one's)")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed version (default: the installed one)")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from vmaescale.cli import debug_wanted, report_user_errors

    args = parse_args(argv)
    return report_user_errors("vmaescale.wheelhouse", run, args, debug=debug_wanted(args))


def run(args: argparse.Namespace) -> int:
    wheels = build_wheelhouse(args.out, args.platform, args.python, args.cuda, args.torch, args.deepspeed)
    size_mb = sum(w.stat().st_size for w in wheels) / 2 ** 20
    print(f"\n{len(wheels)} wheels, {size_mb:.0f} MiB in {args.out}; on the node:\n"
          f"    pip install --no-index --find-links {args.out} vmaescale")
    return 0


if __name__ == "__main__":
    sys.exit(main())
