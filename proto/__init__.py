"""Wire messages between pied's processes. A leaf package: imports nothing from pied or workers."""

from proto.control import *  # noqa: F401,F403
from proto.messages import *  # noqa: F401,F403
