"""Live progress for Celery tasks over Server-Sent Events."""

from .config import ConfigError, Settings
from .events import State
from .worker.bridge import install, uninstall
from .worker.progress import set_message, set_progress, track

__all__ = [
    "ConfigError",
    "Settings",
    "State",
    "install",
    "set_message",
    "set_progress",
    "track",
    "uninstall",
]

__version__ = "0.1.0"
