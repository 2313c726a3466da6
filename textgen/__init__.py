__version__ = "0.2.0"  # the service; /version reports it
