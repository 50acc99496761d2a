"""noisescore: find and correct noisy labels in medical image datasets."""

__version__ = "0.1.0"
