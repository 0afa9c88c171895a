"""vjobs' version, in a module of its own: the container and the API record it in every result, and reading
it from the package (``vjobs/__init__.py``, which imports the API) would be an import circle."""

__version__ = "0.1.0"  # as pyproject.toml's [project] version
