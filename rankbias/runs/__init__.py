"""Many runs: the results store, sweeps, their estimates and the backends that train them."""
