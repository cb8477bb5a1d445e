"""fss: few-shot semantic segmentation suite."""
__version__ = "0.1.0"
