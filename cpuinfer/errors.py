"""The one exception type the public API raises.

Every message is one line that names the file, tensor or field at fault and what was expected,
so the CLI can print it as it is (``cpuinfer: <message>``) and exit with status 1.
"""


class CpuinferError(Exception):
    """Bad input or an unsupported model: the message says what and where."""
