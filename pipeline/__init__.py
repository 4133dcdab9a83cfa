"""The experiment pipeline around δ-mem: data preparation, tracking and the DVC stages' helpers.

The library package ``deltamem`` never imports from here.
"""
