"""The application: the training loop, the evaluation runner and the retrieval service.

It imports the library (``models``, ``datasets``, ``utils``); nothing in the library imports it.
"""
