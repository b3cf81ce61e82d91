"""unimm-jax: unified multimodal models in JAX/Flax. Public surface: `load` and the subpackages."""

from unimm_jax.api import Loaded, load
from unimm_jax.convert.errors import ConversionError

__all__ = ["ConversionError", "Loaded", "load"]
__version__ = "0.1.0"
