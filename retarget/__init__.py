"""Arc2Face identity conditioning, Expression and Reference Adapters, the pipeline, the CLI."""

__version__ = "0.1.0"
