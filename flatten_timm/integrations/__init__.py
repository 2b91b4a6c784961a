""" Bridges to detection and segmentation frameworks (optional dependencies, imported on use)."""
