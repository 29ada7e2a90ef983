"""Where providers differ: one adapter module per wire format, one interface, one model table."""
