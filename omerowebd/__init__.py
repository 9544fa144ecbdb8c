"""omerowebd: a systemd-native supervisor for OMERO.web."""

__version__ = "0.1.0"
