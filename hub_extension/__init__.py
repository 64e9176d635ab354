"""jupyterhub-inference: the service, the Hub-side pieces and the CLI."""

__version__ = "0.1.0"
