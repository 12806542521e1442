"""compare: several fine-tunes of one base at once — subspace similarity, principal angles, intruder dimensions,
amplification (subspace.py, intruders.py: numpy) and the runner that streams them through the engine (run.py)."""
