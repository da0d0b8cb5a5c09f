"""The real-model demo: reversion on SmolLM2-135M-Instruct (`revlens demo --preset smollm2`).

A client of the public revlens API; core modules never import it.
"""
