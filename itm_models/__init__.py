"""Models, data, metrics and evaluation for image-text matching, built on itm_kernels."""
