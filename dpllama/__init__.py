"""dpllama: Llama-family LLM inference on any OpenCL device."""
from dpllama.errors import DpllamaError

__version__ = "0.1.0"
__all__ = ["DpllamaError", "__version__"]
