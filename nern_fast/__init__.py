"""nern_fast: fast NeRN-style neural representations of neural networks.

A small MLP (the predictor) maps a positional encoding of every conv-kernel coordinate (layer,
filter, channel) to that kernel's weights. This package decodes them fast (fused Triton kernels, a
C++/CUDA extension, an eager reference), trains predictors and runs networks from them.
"""
from .encoding import EncodingSpec
from .io import FileFormatError
from .layout import LayerSpec, LayoutError, WeightLayout
from .ops import BackendUnavailable, availability, backend_names
from .predictor import FastPredictor
from .compressed import ModelSpec, load_compressed, save_compressed
from .reference import reference_decode

__version__ = "0.1.0"

__all__ = ["FastPredictor", "WeightLayout", "LayerSpec", "EncodingSpec", "LayoutError",
           "FileFormatError", "BackendUnavailable", "availability", "backend_names",
           "reference_decode", "save_compressed", "load_compressed", "ModelSpec", "__version__"]
