"""fedjax-code: a vectorised federated-learning simulator for code LLMs."""

import os

# transformers warns at import that PyTorch is absent; this package never needs PyTorch.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
