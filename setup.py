"""The configs live in conf/ at the repository root (where `python train.py` finds them); a built
wheel carries a copy as the package data `domino/conf`, which the installed `domino` command and
`domino.api` use. Everything else is declared in setup.cfg."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithConfigs(build_py):
    def run(self):
        super().run()
        src, dst = ROOT / "conf", Path(self.build_lib) / "domino" / "conf"
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)  # no stale configs from an earlier build
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildWithConfigs})
