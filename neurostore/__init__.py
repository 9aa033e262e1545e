"""neurostore: explain what the neurons of vision networks detect, in words, and keep every piece
of evidence in an open Parquet store queried with DuckDB SQL."""

__version__ = "0.1.0"

from .errors import NeurostoreError  # noqa: E402

__all__ = ["NeurostoreError", "__version__"]
