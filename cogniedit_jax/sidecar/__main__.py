from cogniedit_jax.sidecar.server import main

main()
