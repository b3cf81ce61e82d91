"""unimm-jax: unified multimodal models in JAX/Flax. Public surface: `load` and the subpackages."""

from unimm_jax.api import Loaded, family_of, load, load_pipeline
from unimm_jax.convert.errors import ConversionError

__all__ = ["ConversionError", "Loaded", "family_of", "load", "load_pipeline"]
__version__ = "0.1.0"
