"""The official-style evaluation loops, restated: benchmark baselines and test oracles (not for production use)."""
