"""Builds tierlm's C++ CPU kernels (tierlm/kernels/csrc) with this machine's compiler as
part of `pip install` (project metadata lives in pyproject.toml). Build with
`--no-build-isolation` next to an installed torch: an isolated build would resolve its
own torch. The extension is optional: without a compiler, tierlm installs and runs its
PyTorch reference kernels, saying so once."""

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # no torch at build time: nothing to compile against
    ext_modules, cmdclass = [], {}
else:
    ext_modules = [CppExtension(
        "tierlm._kernels", ["tierlm/kernels/csrc/quant_gemm.cpp", "tierlm/kernels/csrc/attention.cpp",
                            "tierlm/kernels/csrc/fused.cpp", "tierlm/kernels/csrc/decoder.cpp",
                            "tierlm/kernels/csrc/lora.cpp"],
        # -ffp-contract=off: every fp32 multiply and add rounds on its own, as the
        # reference kernels in tierlm/kernels/reference.py compute them.
        extra_compile_args=["-O3", "-ffp-contract=off"],
        optional=True)]
    cmdclass = {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
