"""What machine this is, for the record beside every timing. Needs no TensorFlow."""

import platform


def cpu_name() -> str:
    """The CPU model as the OS names it (Linux: /proc/cpuinfo's "model name")."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # Not Linux: fall back to what the platform module knows.
    return platform.processor() or platform.machine()
