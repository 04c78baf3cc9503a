"""Simulated OpenAI-compatible server whose timing follows a continuous-batching engine model.

Run it alone with ``python -m runner.sim --port 8801``, start it as a child process with
``start_sim``, or build the aiohttp application in-process with ``build_app``.
"""

from runner.sim.process import SimProcess, start_sim
from runner.sim.profile import FaultRates, SimProfile, load_profile
from runner.sim.server import DEFAULT_MODEL, build_app

__all__ = ["DEFAULT_MODEL", "FaultRates", "SimProcess", "SimProfile", "build_app", "load_profile", "start_sim"]
