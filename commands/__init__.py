"""One module per `engram` subcommand: options, one library call, rendering.

This is the only package that prints. Each module exposes `register(app)`.
"""
