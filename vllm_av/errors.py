"""User-facing errors: one line, printed by the CLI as ``vllm-av: error: <message>`` (exit 2)."""


class AVError(Exception):
    """A problem with the user's input (checkpoints, options, output directory).

    The message is one line and names the offending file or tensor.
    """
