"""tractoscale: a BIDS App for diffusion MRI."""
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("tractoscale")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
