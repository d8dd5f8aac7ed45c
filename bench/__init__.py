"""The measuring application: one module per mode, run from the repository root as ``python -m bench.<name>``;
bench/base.py holds what they share (sizes, the machine record, step construction through the engine)."""
