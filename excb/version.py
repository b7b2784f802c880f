"""The package version, in a module of its own so that any excb module can read it without importing ``excb``
(whose lazy ``excb.train`` etc. import excb.api, which imports the export)."""

__version__ = "0.1.0"
