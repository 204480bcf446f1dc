"""
The admin API: a Klein application on its own port that lists sessions and
their connections, closes sessions and releases them (in the shapes of the
vendors' release APIs), and renews or resets a port's session.
"""
