"""pip's entry to the C++ build: CMake configures this repository for the interpreter pip runs, builds the
`python` target (the extension largebatch._largebatch) and the wheel takes it beside python/largebatch/*.py."""
import os
import pathlib
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out = pathlib.Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build = pathlib.Path(self.build_temp).resolve() / "cmake"
        build.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("LARGEBATCH_JOBS", "2")
        configure = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     "-DPython3_EXECUTABLE=" + sys.executable, "-DLARGEBATCH_BUILD_TESTS=OFF",
                     "-DLARGEBATCH_BUILD_APPS=OFF", "-DLARGEBATCH_BUILD_EXAMPLES=OFF",
                     "-DLARGEBATCH_BUILD_BENCHMARKS=OFF", "-DLARGEBATCH_TCMALLOC=OFF"]
        # A torch that carries its CMake files (pip's wheels do; Debian's python3-torch does not, its LibTorch is
        # libtorch-dev's) is the LibTorch to build against: the extension must link the libtorch the interpreter
        # loads.
        import torch.utils
        torch_cmake = pathlib.Path(torch.utils.cmake_prefix_path)
        if torch_cmake.is_dir():
            configure.append("-DCMAKE_PREFIX_PATH=" + str(torch_cmake))
        if subprocess.run(["ninja", "--version"], capture_output=True).returncode == 0:
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build), "--target", "python", "-j", jobs], check=True)
        built = next((build / "python" / "largebatch").glob("_largebatch*.so"), None)
        if built is None:
            raise RuntimeError("the CMake build made no extension: is pybind11-dev / python3-dev / torch present? "
                               "(see the CMake output above)")
        out.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(built), str(out / built.name))


setup(ext_modules=[CMakeExtension("largebatch._largebatch")], cmdclass={"build_ext": CMakeBuild})
