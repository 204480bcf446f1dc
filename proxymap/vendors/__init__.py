"""
Vendor integrations: credential presets for the big residential vendors, and
calls to a vendor's own session-release API.
"""
