"""shoprec domain logic: events, Kafka I/O, lake, online state, models, training, serving core."""
