"""
Operations: talking to systemd, stopping gracefully, remembering sessions
across restarts, metrics, and the open-file limit.
"""
