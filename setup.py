"""Package layout.

The top-level ``kernels/`` folder (docs/kernels.md) is installed as ``mulclip_fast.kernels`` through a
package-dir mapping, which setuptools also honours in editable installs. Nothing is compiled here, so
this file never fails without a compiler or CUDA: the C++/CUDA extension of csrc/ builds on first use
(mulclip_fast/ops/extension.py, docs/kernels.md "The C++/CUDA extension").
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["mulclip_fast", "mulclip_fast.*"]) + ["mulclip_fast.kernels"],
    package_dir={"mulclip_fast.kernels": "kernels"},
)
