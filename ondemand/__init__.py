"""ondemand: a scale-to-zero, on-demand emotion2vec+ speech emotion recognition daemon."""

__version__ = "0.1.0"
