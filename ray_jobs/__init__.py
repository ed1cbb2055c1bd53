"""Everything in protoprune that knows about Ray: the driver, the actors and the CLI."""
