"""autoseg: self-configuring AutoML for medical image segmentation."""

__version__ = "0.1.0"
