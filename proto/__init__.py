"""SPINN proto package (filled in by later issues)."""
