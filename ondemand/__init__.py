"""ondemand: a scale-to-zero, on-demand inference daemon for emotion2vec+ speech emotion recognition."""

__version__ = "0.1.0"
