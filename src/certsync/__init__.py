"""certsync: keeps HLF peer-mentor certifications true on the Dynamics portal."""

__version__ = "0.1.0"
