"""Federated learning: local training loop, server logic and the Flower adapters.

``train`` and ``server`` are plain PyTorch; ``messages``, ``client_app``,
``server_app`` and ``simulation`` are the thin Flower layer.
"""
