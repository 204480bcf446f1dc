"""
The data plane: HTTP/1.1 forward proxying and CONNECT tunnels on every mapped port.
"""
