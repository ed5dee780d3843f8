"""Low-communication training: DiLoCo in a mesh and across islands that share only storage.

`compress` turns a pseudo-gradient pytree into a compact, self-describing payload and back.
"""
