"""quantlab: LLM quantization built from scratch, for teaching.

Import the submodules you need (``from quantlab import uniform``); importing ``quantlab`` itself is
cheap and has no side effects.
"""

__version__ = "0.1.0"
