"""neon-ray: Neon (negative extrapolation from self-training) as a distributed Ray job.

θ_neon = θ_base − w·(θ_ft − θ_base), with θ_ft a short fine-tune of θ_base on its own samples.
"""

__version__ = "0.1.0"
