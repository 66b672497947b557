"""SPINN device package (filled in by later issues)."""
