"""Flow-matching sampling for Qwen-Image-Edit: the scheduler, ODE/SDE steps, the jitted edit loop."""
