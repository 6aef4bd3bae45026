"""Builds moeforge's Python package against the torch it finds (docs/python.md): `make python` runs it.

The extension (moeforge._C) is python/src/bindings.cpp compiled with torch's own flags and linked with the
static C++ library of the build folder (MOEFORGE_BUILD, default ../build), which is position-independent for
it; the SentencePiece module the tokenizer loads lies beside the extension in the package.
"""
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, include_paths

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
build = os.path.abspath(os.environ.get("MOEFORGE_BUILD", os.path.join(root, "build")))

setup(
    name="moeforge",
    version="0.1.0",
    description="moeforge's Mixture-of-Experts routers, layers and models for PyTorch",
    packages=["moeforge"],
    package_dir={"moeforge": os.path.join(here, "moeforge")},
    package_data={"moeforge": ["libmoeforge_spm.so"]},
    ext_modules=[
        CppExtension(
            "moeforge._C",
            [os.path.join(here, "src", "bindings.cpp")],
            include_dirs=[os.path.join(root, "include"), root],
            extra_objects=[os.path.join(build, "libmoeforge.a"), os.path.join(build, "libmoeforge_kernels_cpu.a")],
            libraries=["glpk", "z", "zstd", "gloo", "tomlplusplus", "dl", "gomp"],
            # torch's headers as system headers (-isystem wins over the -I torch adds): the warnings at -Wall
            # -Wextra are then our code's only.
            extra_compile_args=["-std=c++17", "-O2", "-fopenmp", "-Wall", "-Wextra"]
            + [f for p in include_paths() for f in ("-isystem", p)],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
