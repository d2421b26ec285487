"""The stages a user runs: prepare, submit, predict, evaluate and the demo (fit, lr-find and boxes fit are whalefast.learn's). They may import every layer below."""
