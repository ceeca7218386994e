"""skinfusion: joint lesion segmentation and diagnosis for dermoscopic images."""

__version__ = "0.1.0"
