"""AsFT core: the pure fine-tuning library behind AsFT Service.

This package imports nothing heavy at import time, so that its stdlib-only modules
(``asft_core.formats``) can be shared by the API, the CLI and the worker. Import the
submodules you need: ``asft_core.alignment``, ``asft_core.penalty``, ``asft_core.training``...
"""

__version__ = "0.1.0"
