"""protoprune's library: pure functions and small classes. Never imports ray."""
