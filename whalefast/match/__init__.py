"""The match layer: loading new photos as a run expects them, scoring them against its ids, growing its catalogue, box models. It imports core, data, nets and runs, never learn."""
