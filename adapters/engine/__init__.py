"""Code that runs inside vLLM processes: the plugin, the LoRA paths, the CPU kernel and the gate math.

Imports nothing from service/ or router/ (checked by tests/unit/test_layers.py).
"""
