"""The exception tree. Each subclass says whose fault it is.

They are turned into exit codes (cli) or verdicts (engine) at exactly one boundary each.
"""


class NfqlbError(Exception):
    """Root of every error nfqlb raises on purpose."""


class ConfigError(NfqlbError):
    """The configuration is wrong: one line naming the file, the key and the problem."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: {key}: {problem}")


class PacketError(NfqlbError):
    """A packet cannot be parsed; ``reason`` is the counter it is counted under. For a first
    fragment, ``frag_key`` names its datagram (the later fragments are dropped with it)."""

    def __init__(self, reason: str, frag_key: bytes | None = None, v6: bool = False) -> None:
        self.reason = reason
        self.frag_key = frag_key
        self.v6 = v6
        super().__init__(reason)


class PolicyError(NfqlbError):
    """A balancing policy could not be loaded, built or run."""


class SystemSetupError(NfqlbError):
    """The host cannot run nfqlb as asked (privileges, missing binaries, busy queue)."""
