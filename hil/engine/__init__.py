"""The software EP engine: the network, the learning rules, the BPTT oracle and the backprop yardstick."""
