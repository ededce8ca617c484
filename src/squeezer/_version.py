"""The package version, in one place (read by the package, the CLI and run manifests)."""

__version__ = "0.1.0"
