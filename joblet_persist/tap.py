"""Composition root: twistd options and makeService.  Reactor thread."""
from twisted.application import service
from twisted.python import usage


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "Path to the YAML configuration file."],
        ["data-dir", "d", None, "Data directory; default socket paths go under DIR/run/."],
    ]


def makeService(options):
    return service.MultiService()
