"""The R² model and its training on cached tokens (CLIP is never loaded here).

``model/`` the R² model, ``data/`` loading, ``engine/`` the training loop, ``sweep/`` sweeps;
configs and presets, store compatibility, checkpoints and inference (``Grounder``).
"""
