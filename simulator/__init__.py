"""loom.simulator: costs a compiled plan (time here; memory in memory.py). Imports loom.spec only, never torch."""
from .hardware import HardwareProfile
from .timing import TimeReport, simulate_time
from .trace import chrome_trace, plot_schedule, write_chrome_trace

__all__ = ["HardwareProfile", "TimeReport", "simulate_time", "chrome_trace", "plot_schedule", "write_chrome_trace"]
