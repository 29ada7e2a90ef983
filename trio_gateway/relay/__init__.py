"""The relay core: the one place where upstream streams are relayed, timed out and cancelled."""
