"""Entry points: the only code that reads the Hydra config. Everything they call takes plain arguments."""
