"""fer_lib: the library behind the FER2013 notebook series.

Importing the package does no work: each concept lives in its own module
(`fer_lib.data`, `fer_lib.models`, `fer_lib.augment`, `fer_lib.training`, ...)
and is imported where it is used.
"""

__version__ = "0.1.0"
