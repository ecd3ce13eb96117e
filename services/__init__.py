"""The real servers saofu starts on loopback: install, start, health, stop, state under .saofu/."""
