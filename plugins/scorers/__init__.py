"""Built-in scorers: ``random`` (tests), ``chgnet`` (CHGNet energy per atom) and ``zmq`` (a remote scorer)."""
