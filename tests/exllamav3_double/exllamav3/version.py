"""The double's version: the real version it stands in for, marked as a double."""

__version__ = "1.6.5+testdouble"
