"""One exception type for every input the user can get wrong.

`train.py` catches it and prints the message alone (no traceback), so each message must name
the key, file or line at fault and say what was expected.
"""


class TunelabError(Exception):
    """Bad configuration, data or checkpoint, detected before any training starts."""
