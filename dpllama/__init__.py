"""dpllama: Llama-family LLM inference on any OpenCL device.

    llm = dpllama.load("smollm2-135m")      # dpllama.llm.load
"""
from dpllama.errors import DpllamaError

__version__ = "0.1.0"
__all__ = ["DpllamaError", "__version__", "load"]


def __getattr__(name: str):
    # imported on first use, so `import dpllama` (and `dpllama --help`) stays free of OpenCL and NumPy
    if name == "load":
        from dpllama.llm import load
        return load
    raise AttributeError(f"module 'dpllama' has no attribute {name!r}")
