"""Offline work: the task suite, expert and gate training, synthetic experts, the PyTorch mixture reference.

Not imported by the serving path.
"""
