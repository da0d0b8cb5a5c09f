"""The real-model pipeline: reversion on any local chat model (`revlens demo --model DIR_OR_GGUF`, or a preset:
``--preset smollm2`` / ``qwen2.5-coder-0.5b``).

A client of the public revlens API; core modules never import it.
"""
