"""Advisory gate: one check per known Kata advisory; a release listed as affected is rejected."""
