"""Which folders become which packages; everything else about the project is in ``pyproject.toml``.

The server lives in the repository's ``service/`` folder but installs as ``onnxprune.service``: a top-level
``service`` package in site-packages would collide with any other project that picked the same plain name.
``pyproject.toml`` alone cannot say this (its ``packages.find`` only names folders after themselves, and an
explicit package list would go stale whenever a subpackage is added), so the list is computed here.
"""

from setuptools import find_namespace_packages, setup

LIBRARY = find_namespace_packages(include=["onnxprune", "onnxprune.*"])
SERVER = ["onnxprune.service", *(f"onnxprune.service.{name}" for name in find_namespace_packages("service"))]

setup(packages=[*LIBRARY, *SERVER], package_dir={"onnxprune.service": "service"})
