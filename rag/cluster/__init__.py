"""Processes: launching servers and waiting for them to be ready.  Never imports torch."""
