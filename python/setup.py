"""Builds libqkv with CMake from the repository around this folder (or
takes the one QKV_LIBRARY names) and installs it inside the package."""
import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def library():
    given = os.environ.get("QKV_LIBRARY")
    if given:
        if not os.path.isfile(given):
            raise SystemExit(f"QKV_LIBRARY={given}: no such file")
        return given
    if not os.path.isfile(os.path.join(ROOT, "CMakeLists.txt")):
        raise SystemExit("qkv: the qkv repository is not around this folder; set "
                         "QKV_LIBRARY to a built libqkv.so")
    build = os.path.join(ROOT, "build-python")
    subprocess.check_call(["cmake", "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                           "-DQKV_BUILD_TESTS=OFF"])
    subprocess.check_call(["cmake", "--build", build, "--target", "qkv_shared", "-j",
                           str(os.cpu_count() or 2)])
    return os.path.join(build, "libqkv.so")


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "qkv", "libqkv.so")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(os.path.realpath(library()), dest)


setup(cmdclass={"build_py": BuildWithLibrary})
