"""da3-serve: real-time 3D reconstruction with Depth Anything 3 behind Ray Serve.

Importing this package does not import Ray; only `serve_app.app` and `serve_app.deployments` do.
"""

__version__ = "0.1.0"
