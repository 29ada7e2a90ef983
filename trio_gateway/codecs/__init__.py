"""Sans-IO codecs: bytes in, values or typed errors out. No I/O, no imports from the rest of us."""
