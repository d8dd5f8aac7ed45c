"""Annotation readers, the synthetic person dataset, transforms, text levels, samplers and collation.

This package deliberately shares its name with the HuggingFace ``datasets`` library, which the project
never uses; running from the repository root (scripts, ``python -m``, pytest) always resolves to this folder.
"""
