__version__ = "0.1.0"  # kept equal to the version in pyproject.toml
