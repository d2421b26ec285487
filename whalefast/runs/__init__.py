"""The runs layer: a run's settings and what it learnt, its input spec, its method, its catalogue and its folder. It imports core, data and nets."""
