"""Exact quant sizes and mixed-precision quants assembled from published branches."""
