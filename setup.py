"""The one thing pyproject.toml cannot say without setuptools' experimental table: the worker's C module.

`optional=True`: a build without a C compiler still installs, and the worker runs the pure-Python reference of
the same functions (worker/native.py says which runs).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "l3ptp.worker._fastpath",
            sources=["worker/_fastpath.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        ),
    ],
)
