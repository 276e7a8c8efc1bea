"""The benchmark's cases: raw redis-py, omnidaemon, the peers, scale and memory."""
