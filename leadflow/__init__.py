"""The composition root: settings, CLI, process roles, web app, observability and the embedded
development servers. The only package that wires concrete adapters together."""

__version__ = "0.1.0"
