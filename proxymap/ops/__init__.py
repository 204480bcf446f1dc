"""
Operations: talking to systemd, stopping gracefully, and remembering
sessions across restarts.
"""
