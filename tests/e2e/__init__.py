"""End-to-end rehearsal of the presets on CPU stand-ins (slow; docs/REHEARSAL.md)."""
