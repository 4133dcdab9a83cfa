"""The DVC stages, run as modules from the repository root (``python -m stages.<name>``, see dvc.yaml).

Running them as modules puts the checkout's root first on ``sys.path``, so a stage (and the torchrun
workers and Ray actors it starts in the same folder) imports this checkout's ``pipeline`` and
``deltamem`` even when another checkout is installed in the environment (``pip install -e``).
"""
