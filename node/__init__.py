"""The node agent: registers with the master, heartbeats, runs assigned stages as subprocesses."""
