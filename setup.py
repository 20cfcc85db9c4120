"""Package layout, and the build hook for the optional CUDA extension in csrc/.

The top-level ``kernels/`` folder (docs/kernels.md) is installed as ``mulclip_fast.kernels`` through a
package-dir mapping, which setuptools also honours in editable installs. No extension is built yet:
the Triton kernels are the fast path, and this file must never fail when CUDA is absent.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["mulclip_fast", "mulclip_fast.*"]) + ["mulclip_fast.kernels"],
    package_dir={"mulclip_fast.kernels": "kernels"},
)
