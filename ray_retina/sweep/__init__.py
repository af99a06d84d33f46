"""Ray Tune sweeps over the focal parameters: search space (``space``), the trial (``trial``), the console
(``console``), the noise floor (``noise``), parameter importance (``importance``), reports (``report``) and
the driver (``run``). ``from ray_retina.sweep.run import run_sweep``."""
