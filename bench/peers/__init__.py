"""The peers' drivers (run inside bench/.peers-venv, never importing omnidaemon) and what they share
with the benchmark."""
